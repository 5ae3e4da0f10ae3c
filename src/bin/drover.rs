#[cfg(unix)]
fn main() -> anyhow::Result<()> {
    cli::main()
}

#[cfg(not(unix))]
fn main() -> anyhow::Result<()> {
    anyhow::bail!("drover runs on Linux and macOS; for Windows only drover-agent is built")
}

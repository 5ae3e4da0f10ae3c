#[cfg(unix)]
fn main() -> anyhow::Result<()> {
    server::main()
}

#[cfg(not(unix))]
fn main() -> anyhow::Result<()> {
    anyhow::bail!("drover-server runs on Linux and macOS; for Windows only drover-agent is built")
}

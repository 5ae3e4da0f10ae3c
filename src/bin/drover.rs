fn main() -> anyhow::Result<()> {
    cli::main()
}

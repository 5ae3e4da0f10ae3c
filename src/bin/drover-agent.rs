fn main() -> anyhow::Result<()> {
    agent::main()
}

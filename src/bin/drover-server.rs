fn main() -> anyhow::Result<()> {
    server::main()
}

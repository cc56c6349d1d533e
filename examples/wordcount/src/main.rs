fn main() -> std::process::ExitCode {
    tempest::main(wordcount::topology)
}

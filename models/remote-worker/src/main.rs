fn main() {
    std::process::exit(viva_remote_worker::worker::main());
}

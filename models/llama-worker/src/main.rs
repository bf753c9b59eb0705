//! `viva-llama-worker`: the evaluator worker process (see the library docs).

fn main() {
    std::process::exit(viva_llama_worker::worker::main());
}

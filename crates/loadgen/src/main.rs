//! `pykp-loadgen` as a plain binary (the checkout's; the wheel carries the same library).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    loadgen::run(&args);
}

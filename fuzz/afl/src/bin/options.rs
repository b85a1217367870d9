//! AFL harness of molt_fuzz::options.

fn main() {
    afl::fuzz!(|data: &[u8]| molt_fuzz::options(data));
}

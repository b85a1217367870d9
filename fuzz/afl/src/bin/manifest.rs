//! AFL harness of molt_fuzz::manifest.

fn main() {
    afl::fuzz!(|data: &[u8]| molt_fuzz::manifest(data));
}

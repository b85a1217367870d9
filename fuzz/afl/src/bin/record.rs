//! AFL harness of molt_fuzz::record.

fn main() {
    afl::fuzz!(|data: &[u8]| molt_fuzz::record(data));
}

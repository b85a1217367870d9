//! AFL harness of molt_fuzz::transfer.

fn main() {
    afl::fuzz!(|data: &[u8]| molt_fuzz::transfer(data));
}

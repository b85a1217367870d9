//! AFL harness of molt_fuzz::state.

fn main() {
    afl::fuzz!(|data: &[u8]| molt_fuzz::state(data));
}

//! AFL harness of molt_fuzz::http.

fn main() {
    afl::fuzz!(|data: &[u8]| molt_fuzz::http(data));
}

//! The first packet of a transfer message, as a receiving molt reads it from the socket.

use cpr::transfer::{decode_head, encode_head, MAX_PAYLOAD};

/// A head that decodes passes the protocol's checks and encodes to the same head again.
pub fn transfer(data: &[u8]) {
    let head = match decode_head(data) {
        Ok(head) => head,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(
        head.payload <= MAX_PAYLOAD,
        "a payload of {} accepted",
        head.payload
    );
    let again = encode_head(&head.message, &head.fds, head.payload).expect("a head encodes");
    assert_eq!(
        decode_head(&again).expect("a re-encoded head decodes"),
        head
    );
}

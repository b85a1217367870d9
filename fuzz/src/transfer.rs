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
    let back = decode_head(&again).expect("a re-encoded head decodes");
    assert_eq!((&back.fds, back.payload), (&head.fds, head.payload));
    // The message compared as JSON, floats to their last bits (see `record::same`).
    let json = |m| serde_json::to_value(m).expect("a message converts to JSON");
    let (was, is) = (json(&head.message), json(&back.message));
    assert!(crate::record::same(&was, &is), "{was} became {is}");
}

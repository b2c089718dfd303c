//! Fuzzes decoding of the link's messages as both ends see them (a frame's payload after
//! its length and CRC): decoding never panics nor allocates what a length field claims
//! before checking it, and whatever decodes encodes back to a frame that decodes the same.
#![no_main]

use drblk::link::proto::{check_crc, decode_payload, encode_frame, peek_hello_version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peek_hello_version(data);
    let _ = check_crc(data, crc32c::crc32c(data));
    if let Ok(msg) = decode_payload(data) {
        let _ = msg.kind();
        let frame = encode_frame(&msg).expect("a decoded message encodes");
        // The frame is length, payload, CRC (see proto.rs); its payload decodes alike.
        let payload = &frame[4..frame.len() - 4];
        let again = decode_payload(payload).expect("an encoded message decodes");
        assert_eq!(format!("{again:?}"), format!("{msg:?}"));
    }
});

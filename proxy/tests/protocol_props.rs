//! Property tests: the proxy's message framing, decoding and statement
//! classification never panic on arbitrary client bytes, and a well-formed
//! message split at any point is reassembled exactly.
use bytes::{BufMut, BytesMut};
use lagrouter_proxy::classify::classify;
use lagrouter_proxy::protocol::{
    Frame, data_row_texts, decode_frontend, decode_startup, rename_statement, split_frame,
    split_startup,
};
use proptest::prelude::*;

const MAX: usize = 1 << 20;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A tagged message with a correct length header.
fn framed(tag: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_i32(4 + body.len() as i32);
    b.put_slice(body);
    b
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn startup_phase_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(packet)) = split_startup(&mut buf) {
            let _ = decode_startup(&packet);
        }
    }

    #[test]
    fn startup_with_valid_length_header_never_panics(body in proptest::collection::vec(any::<u8>(), 4..256)) {
        let mut b = BytesMut::new();
        b.put_i32(4 + body.len() as i32);
        b.put_slice(&body);
        let packet = split_startup(&mut b).unwrap().expect("complete packet");
        let _ = decode_startup(&packet);
    }

    #[test]
    fn arbitrary_messages_never_panic(
        tag in prop::sample::select(b"QPBDECSHFXdcfp!z\0".to_vec()),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut buf = framed(tag, &body);
        let frame = split_frame(&mut buf, MAX).unwrap().expect("complete frame");
        let _ = decode_frontend(&frame);
        let _ = data_row_texts(&frame);
        let _ = rename_statement(&frame, 0, "s");
        let _ = rename_statement(&frame, 1, "s");
    }

    #[test]
    fn random_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(frame)) = split_frame(&mut buf, 4096) {
            let _ = decode_frontend(&frame);
        }
    }

    #[test]
    fn split_query_reassembles(sql in "[ -~]{0,200}", cut in 0usize..300) {
        let mut body = sql.clone().into_bytes();
        body.push(0);
        let whole = framed(b'Q', &body);
        let cut = cut.min(whole.len());
        let mut buf = BytesMut::from(&whole[..cut]);
        let first = split_frame(&mut buf, MAX).unwrap();
        if cut < whole.len() {
            prop_assert!(first.is_none());
            buf.extend_from_slice(&whole[cut..]);
        }
        let frame: Frame = match first {
            Some(f) => f,
            None => split_frame(&mut buf, MAX).unwrap().expect("complete after the rest"),
        };
        prop_assert_eq!(&frame.bytes[..], &whole[..]);
        prop_assert!(decode_frontend(&frame).is_ok());
    }

    #[test]
    fn classify_never_panics(sql in "\\PC{0,300}") {
        let _ = classify(&sql);
    }

    #[test]
    fn classify_never_panics_on_sqlish_text(sql in "(SELECT|INSERT|SET|BEGIN|/\\*|\\*/|--|'|\"|;|\\(|\\)|FOR UPDATE|lagrouter:token=| |[a-z0-9$]){0,60}") {
        let _ = classify(&sql);
    }
}

//! Property tests: the proxy's message framing, decoding and statement
//! classification never panic on arbitrary client bytes (not even a panic
//! caught inside the decoder), well-formed extended-protocol messages always
//! decode, any truncation of them is rejected, and a well-formed message
//! split at any point is reassembled exactly.
use bytes::{BufMut, BytesMut};
use lagrouter_proxy::classify::classify;
use lagrouter_proxy::protocol::{
    Frame, data_row_texts, decode_frontend, decode_startup, rename_statement, split_frame,
    split_startup,
};
use proptest::prelude::*;

const MAX: usize = 1 << 20;

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts every panic in the process, including ones a decoder catches
/// internally, so that "never panics" can fail.
fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn panics() -> usize {
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Encodes extended-protocol messages with `postgres-protocol`.
fn extended_messages(
    name: &str,
    sql: &str,
    types: &[u32],
    params: &[Option<Vec<u8>>],
    formats: &[i16],
) -> Vec<BytesMut> {
    use postgres_protocol::message::frontend;
    let mut out = Vec::new();
    let mut b = BytesMut::new();
    frontend::parse(name, sql, types.iter().copied(), &mut b).unwrap();
    out.push(b);
    let mut b = BytesMut::new();
    let r = frontend::bind(
        name,
        name,
        formats.iter().copied(),
        params.iter(),
        |p, buf| match p {
            Some(v) => {
                buf.put_slice(v);
                Ok(postgres_protocol::IsNull::No)
            }
            None => Ok(postgres_protocol::IsNull::Yes),
        },
        formats.iter().copied(),
        &mut b,
    );
    assert!(r.is_ok());
    out.push(b);
    for kind in [b'S', b'P'] {
        let mut b = BytesMut::new();
        frontend::describe(kind, name, &mut b).unwrap();
        out.push(b);
        let mut b = BytesMut::new();
        frontend::close(kind, name, &mut b).unwrap();
        out.push(b);
    }
    let mut b = BytesMut::new();
    frontend::execute(name, 7, &mut b).unwrap();
    out.push(b);
    let mut b = BytesMut::new();
    frontend::query(sql, &mut b).unwrap();
    out.push(b);
    out
}

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
        count_panics();
        let before = panics();
        let mut buf = framed(tag, &body);
        let frame = split_frame(&mut buf, MAX).unwrap().expect("complete frame");
        let _ = decode_frontend(&frame);
        let _ = data_row_texts(&frame);
        let _ = rename_statement(&frame, 0, "s");
        let _ = rename_statement(&frame, 1, "s");
        prop_assert_eq!(panics(), before);
    }

    #[test]
    fn well_formed_extended_messages_decode_and_truncations_are_rejected(
        name in "[a-z_0-9\\PC]{0,12}",
        sql in "\\PC{0,60}",
        types in proptest::collection::vec(any::<u32>(), 0..4),
        params in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)), 0..5),
        formats in proptest::collection::vec(0i16..2, 0..3),
    ) {
        count_panics();
        let before = panics();
        for whole in extended_messages(&name, &sql, &types, &params, &formats) {
            let frame = split_frame(&mut whole.clone(), MAX).unwrap().expect("complete");
            prop_assert!(decode_frontend(&frame).is_ok(), "{:?}", frame);
            // The same message cut short, with a consistent length header.
            for cut in 1..whole.len() - 5 {
                let mut short = framed(whole[0], &whole[5..whole.len() - cut]);
                let frame = split_frame(&mut short, MAX).unwrap().expect("complete");
                let tag = whole[0];
                // A cut that only shortens the last name or SQL string but
                // keeps a NUL is still well-formed for a few message types.
                if tag == b'B' || tag == b'P' || tag == b'E' {
                    prop_assert!(decode_frontend(&frame).is_err(), "{:?}", frame);
                } else {
                    let _ = decode_frontend(&frame);
                }
            }
        }
        prop_assert_eq!(panics(), before);
    }

    #[test]
    fn random_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let mut buf = BytesMut::from(&bytes[..]);
        count_panics();
        let before = panics();
        while let Ok(Some(frame)) = split_frame(&mut buf, 4096) {
            let _ = decode_frontend(&frame);
        }
        prop_assert_eq!(panics(), before);
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

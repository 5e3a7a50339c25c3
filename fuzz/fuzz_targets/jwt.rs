//! Any bearer token, and any claims signed with the sink's own secret: checking never panics,
//! and a token it accepts is unexpired (within the leeway) and signed by a configured key.
#![no_main]

use jsonwebtoken::{EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use meterflow_guard::auth::{Auth, LEEWAY_S, now_s};

const SECRET: &[u8] = b"fuzzing secret of at least 32 bytes";

fuzz_target!(|data: &[u8]| {
    let auth = Auth::new(vec![Auth::hs256(SECRET)]);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As a token from the wire.
    if let Some(claims) = auth.check(text) {
        assert!(claims.exp + LEEWAY_S >= now_s(), "{claims:?}");
    }
    // As the claims of a correctly signed token.
    if let Ok(body) = serde_json::from_str::<serde_json::Value>(text) {
        let header = Header::new(jsonwebtoken::Algorithm::HS256);
        if let Ok(token) = jsonwebtoken::encode(&header, &body, &EncodingKey::from_secret(SECRET))
            && let Some(claims) = auth.check(&token)
        {
            assert!(claims.exp + LEEWAY_S >= now_s(), "{claims:?} from {body}");
        }
    }
});

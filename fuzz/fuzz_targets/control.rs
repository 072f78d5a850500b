//! Every control message: the per-type size check, the bounded decode and
//! the text escaping. Whatever decodes carries no control characters in its
//! text and re-encodes to something that decodes to the same message.
#![no_main]

use common::control::{max_encoded_len, ControlMsg};
use libfuzzer_sys::fuzz_target;

fn text_is_safe(m: &ControlMsg) -> bool {
    let ok = |s: &str| !s.chars().any(char::is_control);
    match m {
        ControlMsg::SetupRefused { reason } | ControlMsg::Abort { reason, .. } => ok(reason),
        ControlMsg::Verified(v) => ok(&v.method) && ok(&v.detail),
        ControlMsg::DestDone { roles, .. } => roles.iter().all(|r| ok(&r.name) && ok(&r.host)),
        ControlMsg::DestCompleted(s) => s.serial_log.as_deref().is_none_or(ok),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = ControlMsg::decode(data) else {
        return;
    };
    assert!(data.len() <= max_encoded_len(m.name()).expect("known variant"));
    assert!(text_is_safe(&m), "{m:?}");
    if let ControlMsg::Setup(s) = &m {
        let _ = s.check();
    }
    let again = rmp_serde::to_vec_named(&m).expect("encodes");
    let back = ControlMsg::decode(&again).expect("what we decoded decodes again");
    assert_eq!(back.name(), m.name());
});

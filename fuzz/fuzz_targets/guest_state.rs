//! The saved KVM guest state (guest/src/kvm/state.rs), as the destination
//! guest decodes it from the package before touching its VM.
#![no_main]

use guest::kvm::state::VmState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = VmState::decode(data) {
        // What decodes re-encodes.
        let _ = s.encode().expect("a decoded state encodes");
    }
});

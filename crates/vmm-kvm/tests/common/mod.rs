//! Shared by the integration tests that need /dev/kvm.

/// True (after saying why) when KVM cannot be used here: the caller skips.
pub fn skip_without_kvm() -> bool {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("SKIPPED: {e}");
        return true;
    }
    false
}

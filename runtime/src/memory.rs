//! Giving memory back: the data-plane binaries parse a snapshot file once (with the Envoy descriptor pool,
//! ~8 MiB of small blocks) and then never need that memory again.

/// Hands freed heap pages back to the OS. glibc keeps what `free` returns in its arenas (only the top of the
/// heap shrinks by itself), so memory freed after start-up would otherwise stay in the resident set for the
/// process's whole life.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own arenas, under their locks; it may be
    // called at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Elsewhere there is nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_heap() {}

/// Drops the descriptor pool a snapshot file needed and trims the heap.
pub fn release_after_load() {
    xds_proto::codec::release_pool();
    trim_heap();
}

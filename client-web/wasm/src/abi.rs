//! The `extern "C"` boundary: what the `.wasm` exports and imports, and the project's only
//! `unsafe` code (turning the pointers JS passes into slices, and the allocator calls behind
//! `alloc`/`dealloc`). Every export forwards to [`crate::api`]; nothing here decides anything.
//!
//! Calling convention, for the JS glue (`js/chat_core.js`):
//! - byte arguments are `(ptr, len)` pairs of buffers from [`alloc`], filled by the caller and
//!   released by it with [`dealloc`] after the call (`len` 0: `ptr` is ignored);
//! - every export returns a pointer to a result buffer `[n u32 BE][status u8][payload]`, where
//!   `n` counts status and payload; the caller copies it out and calls `dealloc(ptr, 4 + n)`;
//! - [`dealloc`] zeroes what it frees, so secrets do not linger in the linear memory;
//! - randomness comes from the host: the module imports `env.random_fill(ptr, len)`, which
//!   must fill `len` bytes at `ptr` with a CSPRNG (`crypto.getRandomValues`).
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::cell::RefCell;

use crate::api::{Api, ApiResult};

thread_local! {
    /// The instance's objects. wasm32-unknown-unknown runs one thread, so this is one `Api`.
    static API: RefCell<Api> = RefCell::new(Api::default());
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    /// Provided by the host: fill `len` bytes at `ptr` from a CSPRNG.
    fn random_fill(ptr: *mut u8, len: usize);
}

/// The host's CSPRNG (`env.random_fill`) in wasm; the operating system's natively.
pub struct HostRng;

impl rand_core::RngCore for HostRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }

    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: `dest` is a live, writable slice of our linear memory, and the host contract
        // is to write exactly `dest.len()` bytes at `dest.as_mut_ptr()` and nothing else.
        unsafe {
            random_fill(dest.as_mut_ptr(), dest.len())
        };
        #[cfg(not(target_arch = "wasm32"))]
        rand_core::OsRng.fill_bytes(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// The host must return cryptographically secure bytes (the glue uses `crypto.getRandomValues`).
impl rand_core::CryptoRng for HostRng {}

/// Allocates `len` bytes for the caller to fill with an argument. Returns a dangling (never
/// dereferenced) pointer for `len` 0.
#[unsafe(no_mangle)]
pub extern "C" fn alloc(len: usize) -> *mut u8 {
    let Ok(layout) = Layout::array::<u8>(len) else {
        return std::ptr::null_mut();
    };
    if len == 0 {
        return std::ptr::NonNull::<u8>::dangling().as_ptr();
    }
    // SAFETY: the layout has a non-zero size (checked above).
    unsafe { std::alloc::alloc(layout) }
}

/// Zeroes and frees a buffer from [`alloc`] or a result buffer, given its full length.
#[unsafe(no_mangle)]
pub extern "C" fn dealloc(ptr: *mut u8, len: usize) {
    let Ok(layout) = Layout::array::<u8>(len) else {
        return;
    };
    if len == 0 || ptr.is_null() {
        return;
    }
    // SAFETY: the caller passes back a pointer it received from `alloc(len)` or a result
    // buffer of `len` bytes (both allocated with this exact layout) and does not use it again.
    unsafe {
        std::ptr::write_bytes(ptr, 0, len);
        std::alloc::dealloc(ptr, layout);
    }
}

/// Drops the object behind `handle` (its secrets are zeroized); unknown handles are ignored.
#[unsafe(no_mangle)]
pub extern "C" fn free_handle(handle: u32) {
    API.with(|api| api.borrow_mut().free(handle));
}

/// Borrows an argument buffer.
///
/// # Safety
/// Unless `len` is 0, `ptr..ptr + len` must be initialised memory of this instance that nothing
/// writes to until the export returns. The JS glue guarantees it: it allocates with [`alloc`],
/// copies the argument in, calls the export, then frees.
unsafe fn input<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 || ptr.is_null() {
        return &[];
    }
    // SAFETY: guaranteed by this function's contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// Runs one API call and hands its outcome to the caller as a result buffer.
fn call(f: impl FnOnce(&mut Api, &mut HostRng) -> ApiResult) -> *mut u8 {
    let result = API.with(|api| f(&mut api.borrow_mut(), &mut HostRng));
    let (status, body) = match result {
        Ok(payload) => (0u8, payload),
        Err(e) => {
            let code = &e.code.as_bytes()[..e.code.len().min(255)];
            let mut body = Vec::with_capacity(1 + code.len() + e.message.len());
            body.push(code.len() as u8);
            body.extend_from_slice(code);
            body.extend_from_slice(e.message.as_bytes());
            (1u8, body)
        }
    };
    let n = u32::try_from(body.len() + 1).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(&n.to_be_bytes());
    out.push(status);
    out.extend_from_slice(&body);
    // A boxed slice of n + 4 bytes has exactly the layout `dealloc(ptr, n + 4)` frees.
    Box::into_raw(out.into_boxed_slice()).cast::<u8>()
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_generate() -> *mut u8 {
    call(|api, rng| api.keys_generate(rng))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_decode(bytes_ptr: *const u8, bytes_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let bytes = unsafe { input(bytes_ptr, bytes_len) };
    call(|api, _rng| api.keys_decode(bytes))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_encode(keys: u32) -> *mut u8 {
    call(|api, _rng| api.keys_encode(keys))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_identity(keys: u32) -> *mut u8 {
    call(|api, _rng| api.keys_identity(keys))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_signed_prekey(keys: u32) -> *mut u8 {
    call(|api, _rng| api.keys_signed_prekey(keys))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_rotate_signed_prekey(keys: u32) -> *mut u8 {
    call(|api, rng| api.keys_rotate_signed_prekey(keys, rng))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_generate_one_time_prekeys(keys: u32, count: u32) -> *mut u8 {
    call(|api, rng| api.keys_generate_one_time_prekeys(keys, count, rng))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_sign_login(
    keys: u32,
    nonce_ptr: *const u8,
    nonce_len: usize,
    username_ptr: *const u8,
    username_len: usize,
    device_id: u32,
) -> *mut u8 {
    // SAFETY: the glue passes buffers it got from `alloc` and filled (see `input`).
    let (nonce, username) = unsafe {
        (
            input(nonce_ptr, nonce_len),
            input(username_ptr, username_len),
        )
    };
    call(|api, _rng| api.keys_sign_login(keys, nonce, username, device_id))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn keys_bundle(keys: u32, one_time_prekey_id: u32) -> *mut u8 {
    call(|api, _rng| api.keys_bundle(keys, one_time_prekey_id))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn session_initiate(keys: u32, bundle_ptr: *const u8, bundle_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let bundle = unsafe { input(bundle_ptr, bundle_len) };
    call(|api, rng| api.session_initiate(keys, bundle, rng))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn session_accept(keys: u32, message_ptr: *const u8, message_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let message = unsafe { input(message_ptr, message_len) };
    call(|api, _rng| api.session_accept(keys, message))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn session_encrypt(
    session: u32,
    plaintext_ptr: *const u8,
    plaintext_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let plaintext = unsafe { input(plaintext_ptr, plaintext_len) };
    call(|api, rng| api.session_encrypt(session, plaintext, rng))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn session_decrypt(
    session: u32,
    message_ptr: *const u8,
    message_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let message = unsafe { input(message_ptr, message_len) };
    call(|api, _rng| api.session_decrypt(session, message))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn session_encode(session: u32) -> *mut u8 {
    call(|api, _rng| api.session_encode(session))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn session_decode(bytes_ptr: *const u8, bytes_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let bytes = unsafe { input(bytes_ptr, bytes_len) };
    call(|api, _rng| api.session_decode(bytes))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn session_remote_identity(session: u32) -> *mut u8 {
    call(|api, _rng| api.session_remote_identity(session))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn initial_header(message_ptr: *const u8, message_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let message = unsafe { input(message_ptr, message_len) };
    call(|_api, _rng| crate::api::initial_header(message))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn safety_number(
    local_ptr: *const u8,
    local_len: usize,
    local_id_ptr: *const u8,
    local_id_len: usize,
    remote_ptr: *const u8,
    remote_len: usize,
    remote_id_ptr: *const u8,
    remote_id_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes buffers it got from `alloc` and filled (see `input`).
    let (local, local_id, remote, remote_id) = unsafe {
        (
            input(local_ptr, local_len),
            input(local_id_ptr, local_id_len),
            input(remote_ptr, remote_len),
            input(remote_id_ptr, remote_id_len),
        )
    };
    call(|_api, _rng| crate::api::safety_number(local, local_id, remote, remote_id))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn directory_new(public_key_ptr: *const u8, public_key_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let public_key = unsafe { input(public_key_ptr, public_key_len) };
    call(|api, _rng| api.directory_new(public_key))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn directory_from_bytes(bytes_ptr: *const u8, bytes_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let bytes = unsafe { input(bytes_ptr, bytes_len) };
    call(|api, _rng| api.directory_from_bytes(bytes))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn directory_to_bytes(directory: u32) -> *mut u8 {
    call(|api, _rng| api.directory_to_bytes(directory))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn directory_accept_head(
    directory: u32,
    head_ptr: *const u8,
    head_len: usize,
    proof_ptr: *const u8,
    proof_len: usize,
    now: u64,
) -> *mut u8 {
    // SAFETY: the glue passes buffers it got from `alloc` and filled (see `input`).
    let (head, proof) = unsafe { (input(head_ptr, head_len), input(proof_ptr, proof_len)) };
    call(|api, _rng| api.directory_accept_head(directory, head, proof, now))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn directory_verify_key_entry(
    directory: u32,
    leaf_ptr: *const u8,
    leaf_len: usize,
    index: u64,
    proof_ptr: *const u8,
    proof_len: usize,
    head_ptr: *const u8,
    head_len: usize,
    now: u64,
) -> *mut u8 {
    // SAFETY: the glue passes buffers it got from `alloc` and filled (see `input`).
    let (leaf, proof, head) = unsafe {
        (
            input(leaf_ptr, leaf_len),
            input(proof_ptr, proof_len),
            input(head_ptr, head_len),
        )
    };
    call(|api, _rng| api.directory_verify_key_entry(directory, leaf, index, proof, head, now))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_new(
    group_id_ptr: *const u8,
    group_id_len: usize,
    own_id_ptr: *const u8,
    own_id_len: usize,
    members_ptr: *const u8,
    members_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes buffers it got from `alloc` and filled (see `input`).
    let (group_id, own_id, members) = unsafe {
        (
            input(group_id_ptr, group_id_len),
            input(own_id_ptr, own_id_len),
            input(members_ptr, members_len),
        )
    };
    call(|api, rng| api.group_new(group_id, own_id, members, rng))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_own_distribution(group: u32) -> *mut u8 {
    call(|api, _rng| api.group_own_distribution(group))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_process_distribution(
    group: u32,
    from_ptr: *const u8,
    from_len: usize,
    distribution_ptr: *const u8,
    distribution_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes buffers it got from `alloc` and filled (see `input`).
    let (from, distribution) = unsafe {
        (
            input(from_ptr, from_len),
            input(distribution_ptr, distribution_len),
        )
    };
    call(|api, _rng| api.group_process_distribution(group, from, distribution))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_add_member(
    group: u32,
    member_ptr: *const u8,
    member_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let member = unsafe { input(member_ptr, member_len) };
    call(|api, _rng| api.group_add_member(group, member))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_remove_member(
    group: u32,
    member_ptr: *const u8,
    member_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let member = unsafe { input(member_ptr, member_len) };
    call(|api, rng| api.group_remove_member(group, member, rng))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_encrypt(
    group: u32,
    plaintext_ptr: *const u8,
    plaintext_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let plaintext = unsafe { input(plaintext_ptr, plaintext_len) };
    call(|api, _rng| api.group_encrypt(group, plaintext))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_decrypt(group: u32, message_ptr: *const u8, message_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let message = unsafe { input(message_ptr, message_len) };
    call(|api, _rng| api.group_decrypt(group, message))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_encode(group: u32) -> *mut u8 {
    call(|api, _rng| api.group_encode(group))
}

#[cfg(feature = "app")]
#[unsafe(no_mangle)]
pub extern "C" fn group_decode(bytes_ptr: *const u8, bytes_len: usize) -> *mut u8 {
    // SAFETY: the glue passes a buffer it got from `alloc` and filled (see `input`).
    let bytes = unsafe { input(bytes_ptr, bytes_len) };
    call(|api, _rng| api.group_decode(bytes))
}

#[cfg(feature = "verify")]
#[unsafe(no_mangle)]
pub extern "C" fn release_verify(
    public_key_ptr: *const u8,
    public_key_len: usize,
    manifest_ptr: *const u8,
    manifest_len: usize,
    signature_ptr: *const u8,
    signature_len: usize,
    now: i64,
    min_version_ptr: *const u8,
    min_version_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes buffers it got from `alloc` and filled (see `input`).
    let (public_key, manifest, signature, min_version) = unsafe {
        (
            input(public_key_ptr, public_key_len),
            input(manifest_ptr, manifest_len),
            input(signature_ptr, signature_len),
            input(min_version_ptr, min_version_len),
        )
    };
    call(|api, _rng| api.release_verify(public_key, manifest, signature, now, min_version))
}

#[cfg(feature = "verify")]
#[unsafe(no_mangle)]
pub extern "C" fn release_check_file(
    release: u32,
    path_ptr: *const u8,
    path_len: usize,
    contents_ptr: *const u8,
    contents_len: usize,
) -> *mut u8 {
    // SAFETY: the glue passes buffers it got from `alloc` and filled (see `input`).
    let (path, contents) =
        unsafe { (input(path_ptr, path_len), input(contents_ptr, contents_len)) };
    call(|api, _rng| api.release_check_file(release, path, contents))
}

#[cfg(feature = "bench")]
#[unsafe(no_mangle)]
pub extern "C" fn bench(op: u32, iterations: u32) -> *mut u8 {
    call(|_api, rng| crate::api::bench(op, iterations, rng))
}

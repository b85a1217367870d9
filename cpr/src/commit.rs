//! The commit point of a handoff: one page of shared memory (a memfd) that says whether the
//! guest may still be resumed from the record, or has been taken over by a new keeper.
//!
//! The sender creates the page before it hands the VM over; the receiver, the update
//! guardian and every rollback path get the same page. The receiver marks it (with its pid)
//! *before* its first `KVM_RUN`: from then on guest memory may hold writes that the record
//! does not know about, and resuming the record's vCPU and device state over it would corrupt
//! the guest. Every fallback reads the page first and never restores a committed handoff.
//! The mark lives in the memfd, so it survives the death of whoever wrote it.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Size of the page.
const PAGE: usize = 4096;
/// Marks a committed page (high half), with the owner's pid in the low half.
const COMMITTED: u64 = 0x4d4f_4c54 << 32; // "MOLT"
/// Marks a page whose sender took the VM back: nobody may commit it any more.
const ABORTED: u64 = 0x4142_4f52_5445_4421; // "ABORTED!"

/// The commit page of one handoff.
#[derive(Debug)]
pub struct CommitPage {
    fd: OwnedFd,
    word: NonNull<AtomicU64>,
}

// SAFETY: the mapping is only accessed through an atomic and lives as long as the value.
unsafe impl Send for CommitPage {}
// SAFETY: as above; the atomic makes shared access sound.
unsafe impl Sync for CommitPage {}

impl CommitPage {
    /// A new, open (uncommitted) page, close-on-exec.
    pub fn create() -> io::Result<Self> {
        let fd = memfd_create(c"molt-cpr-commit", MFdFlags::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, PAGE as i64)?;
        Self::map(fd)
    }

    /// The page behind `fd` (inherited or received), checked to be one.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let len = nix::sys::stat::fstat(&fd)?.st_size;
        if len != PAGE as i64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a commit page is {PAGE} bytes, this fd holds {len}"),
            ));
        }
        Self::map(fd)
    }

    fn map(fd: OwnedFd) -> io::Result<Self> {
        let len = NonZeroUsize::new(PAGE).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh shared mapping of the page-sized memfd; nothing else in this
        // process uses the range, and it is unmapped only on drop.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }?;
        Ok(Self {
            fd,
            word: ptr.cast(),
        })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned, at least 8 bytes long and valid for as long as
        // `self`; AtomicU64 has no invalid bit patterns.
        unsafe { self.word.as_ref() }
    }

    /// The fd to hand over with the VM.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Marks the handoff committed by `owner`: call before the owner's first `KVM_RUN`.
    /// False when the handoff was aborted (or committed by another) first: then `owner` must
    /// not run the guest.
    pub fn try_commit(&self, owner: u32) -> bool {
        self.word()
            .compare_exchange(
                0,
                COMMITTED | u64::from(owner),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Takes the VM back for the sender: false when a receiver committed first (it owns the
    /// guest now, and the sender must never resume it).
    pub fn try_abort(&self) -> bool {
        self.word()
            .compare_exchange(0, ABORTED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// The page's word, for a process sharing this address space that watches it with
    /// nothing but atomic loads (the live-update holder); valid while `self` is mapped.
    pub fn word_ptr(&self) -> *const AtomicU64 {
        self.word.as_ptr()
    }

    /// The pid that committed, or `None` while the handoff is open.
    pub fn owner(&self) -> Option<u32> {
        let v = self.word().load(Ordering::SeqCst);
        (v & !0xffff_ffff == COMMITTED).then_some(v as u32)
    }
}

impl Drop for CommitPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `map`; no reference to it outlives `self`.
        if let Err(e) = unsafe { munmap(self.word.cast(), PAGE) } {
            log::warn!("cannot unmap the commit page: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_is_seen_through_every_mapping_and_outlives_the_writer() {
        let page = CommitPage::create().unwrap();
        assert_eq!(page.owner(), None);
        let other = CommitPage::from_fd(page.fd().try_clone_to_owned().unwrap()).unwrap();
        assert!(page.try_commit(4242));
        assert!(!page.try_commit(1), "committed once");
        assert!(
            !other.try_abort(),
            "a committed handoff cannot be taken back"
        );
        drop(page);
        assert_eq!(other.owner(), Some(4242));
        let open = CommitPage::create().unwrap();
        assert!(open.try_abort());
        assert!(
            !open.try_commit(7),
            "an aborted handoff cannot be committed"
        );
        assert_eq!(open.owner(), None);
    }

    #[test]
    fn an_fd_that_is_no_commit_page_is_refused() {
        let fd = memfd_create(c"not-a-page", MFdFlags::MFD_CLOEXEC).unwrap();
        assert!(CommitPage::from_fd(fd).is_err());
    }
}

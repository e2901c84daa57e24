//! The folder this user's caches go in (the NCCL link folder, the compiled-kernel cache):
//! `$XDG_CACHE_HOME`, else `~/.cache`, else a folder of this user's own in the temp folder.
//!
//! Without `HOME` (a container, a systemd service), the caches went to the shared temp folder's
//! `dapt/`, which any user could create first: the worker then re-executed itself with that
//! user's folder on `LD_LIBRARY_PATH` (their `libnccl.so` loaded) and read compiled PTX from it
//! (an audit). The temp folder's `dapt-<uid>` is made mode 0700, and one already there is used
//! only when it is a real folder (not a symlink) owned by this user that no one else can enter.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// This user's cache folder (see the module's doc). Errors: the temp folder's `dapt-<uid>` is
/// not this user's private folder (the message says whose and what), or cannot be made.
pub fn user_cache_dir() -> std::io::Result<PathBuf> {
    let from_env = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        });
    match from_env {
        Some(dir) => Ok(dir),
        None => private_dir_in(&std::env::temp_dir()),
    }
}

/// `root/dapt-<uid>`, made mode 0700 if absent; refused unless it is a folder (not a symlink)
/// owned by this user with no access for group or others.
pub fn private_dir_in(root: &Path) -> std::io::Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = root.join(format!("dapt-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    let refuse = |what: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{}: {what}: not this user's private folder, so no cache or library is kept \
                 there (set XDG_CACHE_HOME or HOME to a folder of this user's)",
                dir.display()
            ),
        ))
    };
    if !meta.is_dir() {
        return refuse("a symlink or a file, not a folder".into());
    }
    if meta.uid() != uid {
        return refuse(format!("owned by uid {}", meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        return refuse(format!(
            "mode {:o}: others can enter it",
            meta.mode() & 0o777
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Made private; a folder others can write into, a symlink, and (as root) another user's
    /// folder are refused.
    #[test]
    fn the_temp_fallback_is_private_to_this_user() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = private_dir_in(root.path()).expect("made");
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(private_dir_in(root.path()).expect("again"), dir);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = private_dir_in(root.path()).expect_err("open to others");
        assert!(err.to_string().contains("mode 777"), "{err}");

        std::fs::remove_dir(&dir).expect("rmdir");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        std::os::unix::fs::symlink(&elsewhere, &dir).expect("symlink");
        let err = private_dir_in(root.path()).expect_err("a symlink");
        assert!(err.to_string().contains("symlink"), "{err}");

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::fs::remove_file(&dir).expect("rm");
            std::fs::create_dir(&dir).expect("mkdir");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
            std::os::unix::fs::chown(&dir, Some(4242), Some(4242)).expect("chown");
            let err = private_dir_in(root.path()).expect_err("another user's");
            assert!(err.to_string().contains("owned by uid 4242"), "{err}");
        }
    }
}

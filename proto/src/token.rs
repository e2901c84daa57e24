//! The job's token, the shared secret that lets a worker join: where it is read from and the
//! least a coordinator accepts.
//!
//! A token is read from a file (`--token-file`, `DAPT_TOKEN_FILE`: a Kubernetes Secret mounted
//! as a file), or from `DAPT_TOKEN`; `--token` on the command line works but shows in `ps` to
//! every user of the machine, and the binaries say so. `dapt coordinator` refuses a token shorter
//! than [`MIN_TOKEN_CHARS`]: a guessable token is a guessable job.

use std::path::Path;

/// The shortest token a coordinator accepts: 128 bits written in hex (`openssl rand -hex 16`;
/// `dapt launch` and `deploy/slurm/dapt.sbatch` make longer ones).
pub const MIN_TOKEN_CHARS: usize = 32;

/// The token from `--token` / `DAPT_TOKEN` (`value`) or `--token-file` / `DAPT_TOKEN_FILE`
/// (`file`): exactly one of them.
pub fn resolve(value: Option<String>, file: Option<&Path>) -> Result<String, String> {
    match (value, file) {
        (Some(_), Some(_)) => Err(
            "the token is given twice, by --token or DAPT_TOKEN (set in the environment?) and by \
             --token-file or DAPT_TOKEN_FILE: give one of them"
                .into(),
        ),
        (Some(token), None) => Ok(token),
        (None, Some(file)) => read_file(file),
        (None, None) => {
            Err("the job's token: set DAPT_TOKEN, or give --token-file (or --token)".into())
        }
    }
}

/// Reads a token file: its content without the trailing newline; an empty file is an error. A
/// file every user of the machine can read is warned about (as ssh does of a private key): any
/// of them is then a member of the job (`launch.token` is 0600, the deploy/ Secrets 0400).
pub fn read_file(path: &Path) -> Result<String, String> {
    if let Some(mode) = readable_by_others(path) {
        tracing::warn!(
            "--token-file {}: every user of this machine can read it (mode {mode:o}), and whoever \
             reads it can join the job and hear its data: `chmod 600` it",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    let token = text.trim_end_matches(['\n', '\r']).to_string();
    if token.is_empty() {
        return Err(format!(
            "--token-file {}: the file is empty",
            path.display()
        ));
    }
    Ok(token)
}

/// The permission bits of `path` when users other than its owner and group can read it.
fn readable_by_others(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o004 != 0).then_some(mode)
}

/// Checks that `token` is long enough for a coordinator to accept it.
pub fn check_strength(token: &str) -> Result<(), String> {
    let chars = token.chars().count();
    if chars < MIN_TOKEN_CHARS {
        return Err(format!(
            "the job token is {chars} characters long; a coordinator needs at least \
             {MIN_TOKEN_CHARS} (128 bits as hex: `openssl rand -hex 16`)"
        ));
    }
    if token.chars().all(|c| token.starts_with(c)) {
        return Err("the job token repeats one character: use a random one".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_degenerate_tokens_are_refused() {
        assert!(check_strength("t0ken").is_err());
        assert!(check_strength("replace-me-with-a-random-secret").is_err()); // 31
        assert!(check_strength(&"a".repeat(64)).is_err());
        assert!(check_strength("0123456789abcdef0123456789abcdef").is_ok());
    }

    /// A token file others can read is noticed (it was accepted silently; an audit).
    #[test]
    fn a_token_file_others_can_read_is_noticed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").expect("write");
        for (mode, noticed) in [(0o644, Some(0o644)), (0o640, None), (0o600, None)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            assert_eq!(readable_by_others(&path), noticed, "{mode:o}");
        }
    }

    #[test]
    fn a_token_file_loses_its_trailing_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").expect("write");
        assert_eq!(read_file(&path).as_deref(), Ok("abc"));
        std::fs::write(&path, "\n").expect("write");
        assert!(read_file(&path).unwrap_err().contains("empty"));
        assert!(read_file(&dir.path().join("none")).is_err());
    }
}

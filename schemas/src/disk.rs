//! Room on a disk: a store whose write failed (a full disk) is reopened only once its
//! filesystem has room again, since opening RocksDB writes (a manifest, a log, the replayed
//! log's table) and an open that fails leaves nothing to read from.

use std::path::Path;

/// Free space an agent's spool or a processor's state needs before it is reopened.
pub const ROOM_TO_REOPEN: u64 = 8 << 20;

/// Bytes an unprivileged process may still write on the filesystem holding `path`; `None`
/// when it cannot be asked (no such path, or not a Unix system).
pub fn available_bytes(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let stat = rustix::fs::statvfs(path).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Whether the filesystem holding `path` has room to reopen a store (unknown counts as yes:
/// the open is tried and its error reported).
pub fn room_to_reopen(path: &Path) -> bool {
    available_bytes(path).is_none_or(|free| free >= ROOM_TO_REOPEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temp_dir_has_room_and_a_missing_path_is_unknown() {
        let dir = std::env::temp_dir();
        assert!(available_bytes(&dir).is_some_and(|b| b > 0));
        assert_eq!(available_bytes(Path::new("/no/such/meterflow/path")), None);
    }
}

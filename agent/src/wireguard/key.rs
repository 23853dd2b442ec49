//! The node's WireGuard private key: generated on first start, stored as raw 32 bytes with
//! mode 0600 (Cilium's format), reused on every later start so the published public key stays
//! stable across restarts.

use std::{
    fs::{self, OpenOptions},
    io::{ErrorKind, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use wireguard_control::Key;

use super::WireguardError;

/// A private key that never prints itself.
#[derive(Clone)]
pub struct PrivateKey(Key);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    pub fn key(&self) -> &Key {
        &self.0
    }

    pub fn public(&self) -> Key {
        self.0.get_public()
    }
}

/// Loads the key at `path`, or creates it (and the directory) when missing. A file of the
/// wrong size is an error, not silently replaced: replacing it would change the node's
/// identity under its peers.
pub fn load_or_create(path: &Path) -> Result<PrivateKey, WireguardError> {
    let err = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| WireguardError::KeyFile { op, path, source }
    };
    match fs::read(path) {
        Ok(bytes) => {
            let raw: [u8; 32] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| WireguardError::BadKeyFile {
                        path: path.to_path_buf(),
                        len: bytes.len(),
                    })?;
            let mode = fs::metadata(path)
                .map_err(err("stat"))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "WireGuard key file readable by others: setting mode 0600");
                fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                    .map_err(err("chmod"))?;
            }
            Ok(PrivateKey(Key(raw)))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(err("create directory for"))?;
            }
            let key = Key::generate_private();
            // Written under a temporary name and renamed, so a crash never leaves a truncated
            // key behind; created 0600 from the start so it is never readable by others.
            let tmp = tmp_path(path);
            let _ = fs::remove_file(&tmp);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(err("create"))?;
            file.write_all(key.as_bytes()).map_err(err("write"))?;
            file.sync_all().map_err(err("sync"))?;
            fs::rename(&tmp, path).map_err(err("rename"))?;
            tracing::info!(path = %path.display(), public_key = %key.get_public().to_base64(), "generated a new WireGuard key");
            Ok(PrivateKey(key))
        }
        Err(e) => Err(err("read")(e)),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/strait_wg0.key");
        let first = load_or_create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.public(), second.public());
        assert!(!format!("{first:?}").contains(&first.key().to_base64()));
    }

    #[test]
    fn wrong_size_is_refused_and_loose_mode_is_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, b"short").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(WireguardError::BadKeyFile { len: 5, .. })
        ));
        fs::write(&path, [7u8; 32]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        load_or_create(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

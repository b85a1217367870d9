//! The "newc" cpio format (magic `070701`), as Linux unpacks it from an initramfs: a writer for
//! the Linux boot test and a strict reader that checks what the writer produced.
//!
//! Each member is a 110-byte ASCII header (the magic and 13 fields of 8 hex digits: ino, mode,
//! uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize with
//! the NUL, check), the NUL-terminated name padded to a multiple of 4 bytes counted from the
//! start of the header, then the data padded to a multiple of 4. A member named `TRAILER!!!`
//! ends the archive.

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `mode`.
pub const S_IFMT: u32 = 0o170_000;
/// Directory.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;

/// One archive member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading `/`.
    pub name: String,
    /// Type and permission bits.
    pub mode: u32,
    /// Device number (major, minor) of a device node.
    pub rdev: (u32, u32),
    /// Contents of a regular file.
    pub data: Vec<u8>,
}

impl Entry {
    /// A directory.
    pub fn dir(name: &str, perm: u32) -> Entry {
        Entry {
            name: name.into(),
            mode: S_IFDIR | perm,
            rdev: (0, 0),
            data: Vec::new(),
        }
    }

    /// A regular file.
    pub fn file(name: &str, perm: u32, data: Vec<u8>) -> Entry {
        Entry {
            name: name.into(),
            mode: S_IFREG | perm,
            rdev: (0, 0),
            data,
        }
    }

    /// A character device node.
    pub fn char_dev(name: &str, perm: u32, major: u32, minor: u32) -> Entry {
        Entry {
            name: name.into(),
            mode: S_IFCHR | perm,
            rdev: (major, minor),
            data: Vec::new(),
        }
    }
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn push_member(out: &mut Vec<u8>, ino: u32, e: &Entry) {
    let nlink = if e.mode & S_IFMT == S_IFDIR { 2 } else { 1 };
    let namesize = e.name.len() + 1;
    let fields: [u32; 13] = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(e.data.len()).expect("cpio member larger than 4 GiB"),
        0, // devmajor
        0, // devminor
        e.rdev.0,
        e.rdev.1,
        u32::try_from(namesize).expect("name too long"),
        0, // check (unused by newc)
    ];
    out.extend_from_slice(MAGIC);
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(e.name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(&e.data);
    pad4(out);
}

/// Writes `entries` as a newc archive, followed by the trailer.
///
/// # Panics
/// On a name that is empty, absolute or contains a NUL byte.
pub fn write(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        assert!(
            !e.name.is_empty() && !e.name.starts_with('/') && !e.name.contains('\0'),
            "bad cpio member name {:?}",
            e.name
        );
        push_member(&mut out, i as u32 + 1, e);
    }
    push_member(
        &mut out,
        0,
        &Entry {
            name: TRAILER.into(),
            mode: 0,
            rdev: (0, 0),
            data: Vec::new(),
        },
    );
    out
}

fn hex_field(header: &[u8], index: usize) -> Result<u32, String> {
    let start = MAGIC.len() + index * 8;
    let text = std::str::from_utf8(&header[start..start + 8])
        .map_err(|_| format!("field {index} is not ASCII"))?;
    u32::from_str_radix(text, 16).map_err(|_| format!("field {index} is not hex: {text:?}"))
}

/// Reads a newc archive back, checking the magic, the padding and the trailer.
pub fn read(mut bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let total = bytes.len();
    let mut entries = Vec::new();
    loop {
        let offset = total - bytes.len();
        if offset % 4 != 0 {
            return Err(format!("member at {offset} is not 4-byte aligned"));
        }
        if bytes.len() < HEADER_LEN {
            return Err(format!("archive ends at {offset} without {TRAILER}"));
        }
        let header = &bytes[..HEADER_LEN];
        if &header[..MAGIC.len()] != MAGIC {
            return Err(format!("bad magic at {offset}"));
        }
        let mode = hex_field(header, 1)?;
        let filesize = hex_field(header, 6)? as usize;
        let rdev = (hex_field(header, 9)?, hex_field(header, 10)?);
        let namesize = hex_field(header, 11)? as usize;
        let name_end = HEADER_LEN + namesize;
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start + filesize;
        if namesize == 0 || bytes.len() < data_end {
            return Err(format!("member at {offset} is truncated"));
        }
        if bytes[name_end - 1] != 0 || bytes[name_end..data_start].iter().any(|b| *b != 0) {
            return Err(format!("name of the member at {offset} is not NUL-padded"));
        }
        let name = std::str::from_utf8(&bytes[HEADER_LEN..name_end - 1])
            .map_err(|_| format!("name at {offset} is not UTF-8"))?
            .to_string();
        if name == TRAILER {
            return Ok(entries);
        }
        let data = bytes[data_start..data_end].to_vec();
        let next = data_end.next_multiple_of(4).min(bytes.len());
        if bytes[data_end..next].iter().any(|b| *b != 0) {
            return Err(format!("data of {name:?} is not NUL-padded"));
        }
        entries.push(Entry {
            name,
            mode,
            rdev,
            data,
        });
        bytes = &bytes[next..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let entries = vec![
            Entry::dir("dev", 0o755),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::file("init", 0o755, b"12345".to_vec()),
            Entry::file("e", 0o644, Vec::new()),
        ];
        let bytes = write(&entries);
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(read(&bytes).unwrap(), entries);
    }

    #[test]
    fn header_layout() {
        let bytes = write(&[Entry::file("ab", 0o755, b"xyz".to_vec())]);
        // 110-byte header, "ab\0" → 113, padded to 116, data 3 → 119, padded to 120.
        let h = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(&h[6..14], "00000001", "ino");
        assert_eq!(&h[14..22], "000081ed", "mode 0100755");
        assert_eq!(&h[54..62], "00000003", "filesize");
        assert_eq!(&h[94..102], "00000003", "namesize");
        assert_eq!(&bytes[110..116], b"ab\0\0\0\0");
        assert_eq!(&bytes[116..120], b"xyz\0");
        assert_eq!(&bytes[120..126], b"070701", "trailer follows");
    }

    #[test]
    fn damage_is_detected() {
        let bytes = write(&[Entry::file("f", 0o644, b"data".to_vec())]);
        assert!(read(&bytes[..bytes.len() - 8]).is_err(), "truncated");
        let mut bad = bytes.clone();
        bad[0] = b'1';
        assert!(read(&bad).is_err(), "magic");
    }
}

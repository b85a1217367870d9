//! Reading a Linux boot log off the serial console: the `[    1.234567] ` timestamps, the
//! command line, the `BIOS-e820` map and the `Memory:` line.

/// One `BIOS-e820` line: `[mem 0xSTART-0xEND] usable`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct E820Line {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive, as Linux prints it).
    pub end: u64,
    /// `usable`, `reserved`, ...
    pub kind: String,
}

/// Splits `[    1.234567] text` into the timestamp in µs and the text. `None` for a line
/// without a printk timestamp.
pub fn split_timestamp(line: &str) -> Option<(u64, &str)> {
    let rest = line.strip_prefix('[')?;
    let (stamp, text) = rest.split_once("] ")?;
    let (secs, micros) = stamp.trim().split_once('.')?;
    if micros.len() != 6 {
        return None;
    }
    let us = secs.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?;
    Some((us, text))
}

/// The text of the kernel's log lines (timestamps removed); lines without a timestamp are
/// left out.
pub fn texts<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    lines
        .into_iter()
        .filter_map(|l| split_timestamp(l).map(|(_, t)| t))
        .collect()
}

/// The command line Linux reports (`Command line: ...`).
pub fn command_line<'a>(texts: &[&'a str]) -> Option<&'a str> {
    texts.iter().find_map(|t| t.strip_prefix("Command line: "))
}

/// The `BIOS-e820` lines, parsed.
pub fn e820(texts: &[&str]) -> Vec<E820Line> {
    texts
        .iter()
        .filter_map(|t| {
            let rest = t.strip_prefix("BIOS-e820: [mem ")?;
            let (range, kind) = rest.split_once("] ")?;
            let (start, end) = range.split_once('-')?;
            let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
            Some(E820Line {
                start: hex(start)?,
                end: hex(end)?,
                kind: kind.trim().to_string(),
            })
        })
        .collect()
}

/// `Memory: 207552K/523896K available (...)`: the available and total KiB.
pub fn memory_kib(texts: &[&str]) -> Option<(u64, u64)> {
    texts.iter().find_map(|t| {
        let rest = t.strip_prefix("Memory: ")?;
        let (avail, rest) = rest.split_once("K/")?;
        let (total, rest) = rest.split_once('K')?;
        rest.starts_with(" available")
            .then_some(())
            .and(Some((avail.parse().ok()?, total.parse().ok()?)))
    })
}

/// A line with every run of digits replaced by `#`: what stays the same from boot to boot
/// (timestamps, TSC frequencies and clock offsets differ).
pub fn shape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_digits = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &[&str] = &[
        "[    0.000000] Linux version 6.1.0-50-amd64 (debian-kernel@lists.debian.org)",
        "[    0.000000] Command line: console=ttyS0 nokaslr",
        "[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "[    0.000000] BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "not a kernel line",
        "[   12.345678] Memory: 207552K/523896K available (14342K kernel code, 2331K rwdata)",
    ];

    #[test]
    fn reads_the_boot_log() {
        assert_eq!(split_timestamp(LOG[5]).unwrap().0, 12_345_678);
        assert!(split_timestamp(LOG[4]).is_none());
        assert!(split_timestamp("[1.2] x").is_none());
        let t = texts(LOG.iter().copied());
        assert_eq!(t.len(), 5);
        assert_eq!(command_line(&t), Some("console=ttyS0 nokaslr"));
        assert_eq!(
            e820(&t),
            [
                E820Line {
                    start: 0,
                    end: 0x9fbff,
                    kind: "usable".into()
                },
                E820Line {
                    start: 0x9fc00,
                    end: 0xfffff,
                    kind: "reserved".into()
                }
            ]
        );
        assert_eq!(memory_kib(&t), Some((207_552, 523_896)));
        assert_eq!(memory_kib(&["Memory: lots"]), None);
        assert_eq!(shape("tsc: Detected 2445.428 MHz"), "tsc: Detected #.# MHz");
    }
}

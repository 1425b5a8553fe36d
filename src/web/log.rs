//! A run's log, read for the dashboard: its end for the run page, and what
//! was appended since a byte offset for `/api/runs/{id}/log`, which the
//! page's script polls while the run is active. Only files inside the
//! ledger's log folder are read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of a log's end the run page shows, and a reset starts from.
pub(crate) const TAIL: u64 = 16 * 1024;

/// The most one read after an offset returns.
pub(crate) const CHUNK: u64 = 64 * 1024;

/// The note for a path the dashboard does not serve.
pub(crate) const OUTSIDE: &str = "it is outside the ledger's log folder";

/// Why a log is not read.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Outside the log folder (symlinks resolved), not a file, or there is
    /// no log folder.
    Outside,
    /// The file cannot be opened or read here.
    Unreadable(std::io::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Outside => f.write_str(OUTSIDE),
            Refused::Unreadable(e) => e.fmt(f),
        }
    }
}

/// A piece of a log: the text of the bytes `from..offset`, cut so that it
/// ends on a whole character (a character split by the end of what was
/// written is left for the next read).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// Where the text starts in the file.
    pub from: u64,
    /// Where the text ends: the offset to read from next.
    pub offset: u64,
    pub text: String,
    /// Whether more was there than one read returns.
    pub more: bool,
    /// Whether the offset asked for was past the end (the file was
    /// truncated or replaced), so this is the file's tail instead.
    pub reset: bool,
}

/// Opens the log at `path` if it lies inside `dir`, the ledger's log
/// folder, once both are canonical (so a symlink out of the folder, or a
/// `..`, is refused too).
pub(crate) fn open(dir: Option<&Path>, path: &Path) -> Result<File, Refused> {
    let dir = dir
        .and_then(|d| std::fs::canonicalize(d).ok())
        .ok_or(Refused::Outside)?;
    let real = std::fs::canonicalize(path).map_err(Refused::Unreadable)?;
    if !real.starts_with(&dir) || !real.is_file() {
        return Err(Refused::Outside);
    }
    File::open(&real).map_err(Refused::Unreadable)
}

/// The end of the log: at most [`TAIL`] bytes, from the start of a line
/// (unless one line is longer than that).
pub(crate) fn tail(file: &mut File) -> std::io::Result<Chunk> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL);
    // One byte before, to know whether `start` begins a line.
    let before = start.saturating_sub(1);
    let mut bytes = read_at(file, before, TAIL + 1)?;
    let skip = if start == 0 {
        0
    } else {
        match bytes.iter().position(|&b| b == b'\n') {
            Some(newline) => newline + 1,
            None => 1,
        }
    };
    bytes.drain(..skip.min(bytes.len()));
    let from = before + skip as u64;
    let keep = whole_chars(&bytes);
    bytes.truncate(keep);
    Ok(Chunk {
        from,
        offset: from + keep as u64,
        text: String::from_utf8_lossy(&bytes).into_owned(),
        more: false,
        reset: false,
    })
}

/// What was written after byte `from`: at most [`CHUNK`] bytes, cut at
/// the last line's end when there is more; the file's [`tail`] if `from`
/// is past its end.
pub(crate) fn after(file: &mut File, from: u64) -> std::io::Result<Chunk> {
    let len = file.metadata()?.len();
    if from > len {
        return Ok(Chunk {
            reset: true,
            ..tail(file)?
        });
    }
    let mut bytes = read_at(file, from, CHUNK)?;
    let more = bytes.len() as u64 == CHUNK;
    let keep = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(newline) if more => newline + 1,
        _ => whole_chars(&bytes),
    };
    bytes.truncate(keep);
    Ok(Chunk {
        from,
        offset: from + keep as u64,
        text: String::from_utf8_lossy(&bytes).into_owned(),
        more,
        reset: false,
    })
}

/// At most `limit` bytes from `at`.
fn read_at(file: &mut File, at: u64, limit: u64) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(at))?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// How many of `bytes` to keep so that a UTF-8 character its end cuts in
/// two is left out (bytes that are not UTF-8 at all are kept).
fn whole_chars(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(4) {
        let b = bytes[len - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let width = match b {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if back < width { len - back } else { len };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    #[test]
    fn a_read_after_an_offset_returns_what_was_appended() {
        let (mut f, mut file) = file_with(b"one\ntwo\n");
        let first = after(&mut file, 0).unwrap();
        assert_eq!((first.text.as_str(), first.offset), ("one\ntwo\n", 8));
        assert!(!first.more && !first.reset);
        assert_eq!(after(&mut file, 8).unwrap().text, "");
        f.write_all(b"three\npart").unwrap();
        let next = after(&mut file, 8).unwrap();
        assert_eq!(
            (next.text.as_str(), next.from, next.offset),
            ("three\npart", 8, 18)
        );
    }

    #[test]
    fn a_character_cut_by_the_end_waits_for_the_next_read() {
        let (mut f, mut file) = file_with("né".as_bytes());
        // "é" is two bytes; write only the first.
        f.write_all(&"é".as_bytes()[..1]).unwrap();
        let chunk = after(&mut file, 0).unwrap();
        assert_eq!((chunk.text.as_str(), chunk.offset), ("né", 3));
        f.write_all(&"é".as_bytes()[1..]).unwrap();
        let chunk = after(&mut file, 3).unwrap();
        assert_eq!((chunk.text.as_str(), chunk.offset), ("é", 5));
        assert_eq!(whole_chars("a€".as_bytes()), 4);
        assert_eq!(whole_chars(&"a€".as_bytes()[..3]), 1);
        assert_eq!(whole_chars(b"\xff"), 1);
    }

    #[test]
    fn a_long_log_comes_in_chunks_of_whole_lines() {
        let line = "x".repeat(99) + "\n";
        let (_f, mut file) = file_with(line.repeat(1000).as_bytes());
        let mut offset = 0;
        let mut text = String::new();
        loop {
            let chunk = after(&mut file, offset).unwrap();
            assert!(chunk.offset - chunk.from <= CHUNK);
            assert!(chunk.text.is_empty() || chunk.text.ends_with('\n'));
            text.push_str(&chunk.text);
            offset = chunk.offset;
            if !chunk.more {
                break;
            }
        }
        assert_eq!(text, line.repeat(1000));
    }

    #[test]
    fn the_tail_starts_at_a_line_and_a_truncated_file_restarts_from_it() {
        let line = "y".repeat(99) + "\n";
        let body = line.repeat(1000);
        let (f, mut file) = file_with(body.as_bytes());
        let tail_ = tail(&mut file).unwrap();
        assert_eq!(tail_.offset, body.len() as u64);
        assert!(tail_.text.starts_with('y') && tail_.text.len() as u64 <= TAIL);
        assert_eq!(tail_.text.len() % 100, 0, "whole lines");
        // Truncated and written again: the old offset is past the end.
        std::fs::write(f.path(), "fresh\n").unwrap();
        let chunk = after(&mut file, tail_.offset).unwrap();
        assert!(chunk.reset);
        assert_eq!(
            (chunk.text.as_str(), chunk.from, chunk.offset),
            ("fresh\n", 0, 6)
        );
    }

    #[test]
    fn only_files_inside_the_folder_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        std::fs::write(logs.join("a.log"), "a").unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), logs.join("link.log")).unwrap();
        assert!(open(Some(&logs), &logs.join("a.log")).is_ok());
        for path in [
            logs.join("link.log"),
            logs.join("..").join("secret"),
            dir.path().join("secret"),
            logs.clone(),
        ] {
            assert!(
                matches!(open(Some(&logs), &path), Err(Refused::Outside)),
                "{path:?}"
            );
        }
        assert!(matches!(
            open(None, &logs.join("a.log")),
            Err(Refused::Outside)
        ));
        assert!(matches!(
            open(Some(&logs), &logs.join("missing.log")),
            Err(Refused::Unreadable(_))
        ));
    }
}

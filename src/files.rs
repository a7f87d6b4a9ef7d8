//! Files in and out, the same way everywhere.
//!
//! In: a path is read only when it is a regular file (a symlink to one is
//! fine): a FIFO would block the open, a device would never end, a folder is
//! a mistake. The open itself does not block (O_NONBLOCK on Unix) and the
//! check is made on the opened handle, so nothing can be swapped in between.
//! Text files (configs, tokenizers, index files) are read with a size bound.
//!
//! Out: [`write_atomically`] writes a uniquely named temporary file beside the
//! target (created new, so an existing file or symlink of that name is never
//! followed), flushes it to disk and renames it into place: the target holds
//! the old content or the whole new one, never a part, and two runs writing
//! the same target do not collide.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The largest config, index or tokenizer file we read (the real ones are a
/// few MiB at most).
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// The largest input image file we read.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{}: {what}: {e}", path.display()))
}

/// Opens `path` for reading if it is a regular file (or a symlink to one).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // A FIFO would block the open until a writer appears; with
        // O_NONBLOCK it opens at once and is refused below.
        o.custom_flags(libc::O_NONBLOCK);
    }
    let file = o.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a folder"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {kind}, expected a file"),
        ));
    }
    Ok(file)
}

/// Whether `path` is a regular file (or a symlink to one).
pub fn is_regular_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Reads a whole regular file of at most `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = open_regular(path).map_err(|e| io_error(path, "cannot read", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_error(path, "cannot read", e))?
        .len();
    if len > max {
        return Err(Error::Io(format!(
            "{}: {len} bytes, more than the {max} this kind of file may have",
            path.display()
        )));
    }
    let mut out = Vec::with_capacity(len as usize);
    // The take bounds the read even if the file grows meanwhile.
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| io_error(path, "cannot read", e))?;
    if out.len() as u64 > max {
        return Err(Error::Io(format!(
            "{}: grew past {max} bytes while being read",
            path.display()
        )));
    }
    Ok(out)
}

/// Reads a regular UTF-8 text file of at most [`MAX_TEXT_BYTES`].
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_bounded(path, MAX_TEXT_BYTES)?)
        .map_err(|e| io_error(path, "not UTF-8 text", e))
}

/// Reads and parses a JSON file of at most [`MAX_TEXT_BYTES`].
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&read_text(path)?).map_err(|e| io_error(path, "not valid JSON", e))
}

/// The folder a new file at `path` goes into; an error when it does not exist.
pub fn output_dir(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::Io(format!(
            "{}: the folder {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    Ok(dir)
}

/// A name for a temporary file beside `path` that no other writer (thread or
/// process) picks at the same time.
fn temp_name(path: &Path, tag: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io(format!("{}: not a file path", path.display())))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(output_dir(path)?.join(format!(
        ".{}.{}-{n}-{nanos:08x}.{tag}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Creates a new file; fails if anything (a file, a symlink) has that name.
fn create_new(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Checks that `path` can be an output: a file name (not an existing folder)
/// in an existing folder that accepts new files (probed by creating and
/// removing a file), so a long run does not end in a failed write.
pub fn check_output(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::Io(format!(
            "{}: is a folder; give a file path for the output",
            path.display()
        )));
    }
    let probe = temp_name(path, "probe")?;
    create_new(&probe).map_err(|e| io_error(path, "cannot write there", e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes `path` whole or not at all: `write` fills a new, uniquely named
/// temporary file beside it, which is flushed to disk and renamed into place
/// only when complete; on any error the temporary file is removed.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    if path.is_dir() {
        return Err(Error::Io(format!(
            "{}: is a folder; give a file path for the output",
            path.display()
        )));
    }
    let tmp = temp_name(path, "partial")?;
    let file = create_new(&tmp).map_err(|e| io_error(path, "cannot write", e))?;
    let result = (|| {
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| io_error(path, "cannot write", e.error()))?;
        file.sync_all()
            .map_err(|e| io_error(path, "cannot write", e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| io_error(path, "cannot write", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |w| {
        w.write_all(bytes)
            .map_err(|e| io_error(path, "cannot write", e))
    })
}

/// Whether two paths name the same existing file (same device and inode on
/// Unix, so hard links and symlinks count; the same canonical path elsewhere).
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
}

/// Where a path that may not exist yet would be: its folder canonicalised,
/// its file name kept (for comparing outputs with one another).
pub fn output_identity(path: &Path) -> Option<PathBuf> {
    let dir = output_dir(path).ok()?;
    Some(std::fs::canonicalize(dir).ok()?.join(path.file_name()?))
}

/// Every regular file at `path`: the file itself, or those in the folder and
/// its subfolders (to `depth` levels) — the files a model path may be read from.
pub fn files_under(path: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if is_regular_file(path) {
        out.push(path.to_path_buf());
    } else if depth > 0 {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                out.extend(files_under(&e.path(), depth - 1));
            }
        }
    }
    out
}

/// Refuses outputs that would overwrite an input, or one another: each output
/// must not be the same file as any input (compared by identity, so links and
/// `..` detours count), nor land where another output goes.
pub fn check_outputs_apart(outputs: &[(&str, PathBuf)], inputs: &[PathBuf]) -> Result<()> {
    for (i, (flag, out)) in outputs.iter().enumerate() {
        if let Some(inp) = inputs.iter().find(|inp| same_file(out, inp)) {
            return Err(Error::Io(format!(
                "{}: {flag} would overwrite the input {}",
                out.display(),
                inp.display()
            )));
        }
        let id = output_identity(out);
        for (flag2, out2) in &outputs[..i] {
            if id.is_some() && id == output_identity(out2) {
                return Err(Error::Io(format!(
                    "{}: {flag} and {flag2} name the same file",
                    out.display()
                )));
            }
        }
    }
    Ok(())
}

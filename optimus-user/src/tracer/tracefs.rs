//! Tracepoint record layouts from tracefs `format` files, so the block I/O program reads
//! its fields at the offsets of the running kernel rather than at compiled-in guesses.

use std::path::{Path, PathBuf};

/// Byte offset and size of one field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Errors reading a tracepoint format file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no field {field}")]
    MissingField { path: PathBuf, field: String },
}

/// Where tracefs is mounted (`/sys/kernel/tracing`), under a sysfs root.
pub fn tracefs_dir(sys: &Path) -> PathBuf {
    sys.join("kernel/tracing")
}

/// `events/<category>/<name>/format` under the tracefs mount.
pub fn format_path(sys: &Path, category: &str, name: &str) -> PathBuf {
    tracefs_dir(sys)
        .join("events")
        .join(category)
        .join(name)
        .join("format")
}

/// Finds `field` (the name after the type, e.g. `bytes` in `unsigned int bytes;`, `rwbs` in
/// `char rwbs[10];`) in a format file's text.
pub fn find_field(text: &str, field: &str) -> Option<Field> {
    text.lines().find_map(|line| {
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse().ok();
            } else if let Some(s) = part.strip_prefix("size:") {
                size = s.parse().ok();
            }
        }
        let last = decl?.split_whitespace().last()?;
        let name = last.split('[').next()?;
        (name == field).then_some(Field {
            offset: offset?,
            size: size?,
        })
    })
}

/// Reads the format file of `category:name` and returns the named fields, in order.
pub fn fields(
    sys: &Path,
    category: &str,
    name: &str,
    wanted: &[&str],
) -> Result<Vec<Field>, FormatError> {
    let path = format_path(sys, category, name);
    let text = std::fs::read_to_string(&path).map_err(|source| FormatError::Read {
        path: path.clone(),
        source,
    })?;
    wanted
        .iter()
        .map(|f| {
            find_field(&text, f).ok_or_else(|| FormatError::MissingField {
                path: path.clone(),
                field: (*f).to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BLOCK_IO_START: &str = "name: block_io_start\nID: 2102\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;\n\
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;\n\
\tfield:__data_loc char[] cmd;\toffset:60;\tsize:4;\tsigned:0;\n";

    #[test]
    fn parses_fields_of_block_io_start() {
        assert_eq!(
            find_field(BLOCK_IO_START, "dev"),
            Some(Field { offset: 8, size: 4 })
        );
        assert_eq!(
            find_field(BLOCK_IO_START, "bytes"),
            Some(Field {
                offset: 28,
                size: 4
            })
        );
        assert_eq!(
            find_field(BLOCK_IO_START, "rwbs"),
            Some(Field {
                offset: 34,
                size: 10
            })
        );
        assert_eq!(find_field(BLOCK_IO_START, "sector").unwrap().size, 8);
        assert_eq!(find_field(BLOCK_IO_START, "nr_sector"), None);
        assert_eq!(find_field("garbage\n\n", "dev"), None);
    }
}

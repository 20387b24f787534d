//! The one reader for the bundled tables under `data/`: pipe-separated text,
//! `#` comment lines (each file's header comment says what public source its
//! content follows), one header row, then one row per entry.

/// A bundled table failed to parse: a bug in the shipped data, caught by tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bundled table `{table}` line {line}: {reason}")]
pub(crate) struct TableError {
    pub table: &'static str,
    pub line: usize,
    pub reason: String,
}

/// One data row: its 1-based line number in the file and its trimmed cells.
pub(crate) struct Row {
    pub table: &'static str,
    pub line: usize,
    pub cells: Vec<&'static str>,
}

impl Row {
    pub fn error(&self, reason: impl Into<String>) -> TableError {
        TableError {
            table: self.table,
            line: self.line,
            reason: reason.into(),
        }
    }

    /// A number cell; an empty cell is `None`.
    pub fn optional_number(&self, column: usize) -> Result<Option<f64>, TableError> {
        let cell = self.cells[column];
        if cell.is_empty() {
            return Ok(None);
        }
        cell.parse::<f64>()
            .map(Some)
            .map_err(|_| self.error(format!("column {} is not a number: `{cell}`", column + 1)))
    }

    /// A cell that must not be empty.
    pub fn required(&self, column: usize) -> Result<&'static str, TableError> {
        match self.cells[column] {
            "" => Err(self.error(format!("column {} is empty", column + 1))),
            cell => Ok(cell),
        }
    }
}

/// Splits a table into rows after checking the header row is exactly `header`.
pub(crate) fn parse_rows(
    table: &'static str,
    text: &'static str,
    header: &[&str],
) -> Result<Vec<Row>, TableError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    let Some((header_line, header_text)) = lines.next() else {
        return Err(TableError {
            table,
            line: 0,
            reason: "no header row".to_owned(),
        });
    };
    let found: Vec<&str> = header_text.split('|').map(str::trim).collect();
    if found != header {
        return Err(TableError {
            table,
            line: header_line,
            reason: format!("header is {found:?}, expected {header:?}"),
        });
    }
    lines
        .map(|(line, row_text)| {
            let cells: Vec<&'static str> = row_text.split('|').map(str::trim).collect();
            if cells.len() != header.len() {
                return Err(TableError {
                    table,
                    line,
                    reason: format!("{} cells, expected {}", cells.len(), header.len()),
                });
            }
            Ok(Row { table, line, cells })
        })
        .collect()
}

impl From<&TableError> for crate::ToolError {
    fn from(error: &TableError) -> crate::ToolError {
        crate::ToolError::BundledTable {
            table: error.table,
            reason: error.to_string(),
        }
    }
}

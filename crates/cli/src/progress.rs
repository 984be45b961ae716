//! Progress bars for the commands that can take more than a second (mkfs
//! of a large image, put and get of trees, check, recover): drawn on
//! standard error when it is a terminal, never into a pipe or a file, and
//! not at all with `-q`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Should bars be drawn at all?
fn wanted(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

fn target() -> ProgressDrawTarget {
    ProgressDrawTarget::stderr_with_hz(10)
}

/// A bar over `total` steps of `unit`, or `None` where nothing is drawn.
pub fn bar(what: &str, unit: &str, total: u64, quiet: bool) -> Option<ProgressBar> {
    if !wanted(quiet) {
        return None;
    }
    let style = ProgressStyle::with_template(&format!(
        "{what} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let b = ProgressBar::with_draw_target(Some(total), target()).with_style(style);
    Some(b)
}

/// A spinner with a message, for work whose length is unknown (journal
/// recovery at open, tree copies).
pub fn spinner(what: &str, quiet: bool) -> Option<ProgressBar> {
    if !wanted(quiet) {
        return None;
    }
    let style = ProgressStyle::with_template(&format!("{what} {{spinner}} {{msg}} ({{elapsed}})"))
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let b = ProgressBar::with_draw_target(None, target()).with_style(style);
    b.enable_steady_tick(Duration::from_millis(100));
    Some(b)
}

/// The library's progress callback, moving `bar`.
pub fn ext4(bar: &ProgressBar) -> folio_ext4::Progress {
    let b = bar.clone();
    folio_ext4::Progress::new(move |done, total| {
        b.set_length(total);
        b.set_position(done);
    })
}

/// The bar of the running tree copy (put or get), if one is drawn.
static COPY: Mutex<Option<(ProgressBar, u64, u64)>> = Mutex::new(None);

/// Start counting a tree copy.
pub fn copy_start(what: &str, quiet: bool) {
    if let Some(b) = spinner(what, quiet) {
        *COPY.lock().unwrap_or_else(|e| e.into_inner()) = Some((b, 0, 0));
    }
}

/// One more entry copied, and `bytes` more of data.
pub fn copied(entries: u64, bytes: u64) {
    let mut g = COPY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((b, n, sum)) = g.as_mut() {
        *n += entries;
        *sum += bytes;
        b.set_message(format!("{n} entries, {}", indicatif::BinaryBytes(*sum)));
    }
}

/// The copy is over: clear its line.
pub fn copy_done() {
    if let Some((b, _, _)) = COPY.lock().unwrap_or_else(|e| e.into_inner()).take() {
        b.finish_and_clear();
    }
}

//! Labelled image grids (like AUTOMATIC1111's X/Y plot): a header row of column labels, a first
//! column of row labels, each cell's mean luminance printed under it, and footnotes under the
//! grid. Text uses an 8x8 bitmap
//! font compiled into the binary (font8x8, public domain), so no system fonts are needed.

use font8x8::legacy::BASIC_LEGACY;

/// Glyph size in font pixels, and the scale they are drawn at.
const GLYPH: usize = 8;
const TEXT_SCALE: usize = 2;
const LINE_HEIGHT: usize = GLYPH * TEXT_SCALE + 4;
const PADDING: usize = 8;
/// Small images (the demo's 32 px) are enlarged to at least this many pixels a side.
const MIN_CELL_SIDE: usize = 192;
const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const GREY: [u8; 3] = [200, 200, 200];
/// Every cell's frame: lighter than a missing cell's fill.
const LIGHT_GREY: [u8; 3] = [225, 225, 225];

/// An RGB canvas.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize, colour: [u8; 3]) -> Self {
        Self {
            width,
            height,
            rgb: colour.iter().copied().cycle().take(width * height * 3).collect(),
        }
    }

    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, colour: [u8; 3]) {
        for row in y..(y + h).min(self.height) {
            for col in x..(x + w).min(self.width) {
                let i = (row * self.width + col) * 3;
                self.rgb[i..i + 3].copy_from_slice(&colour);
            }
        }
    }

    /// Draws `text` (ASCII; anything else as `?`) with its top-left at (x, y), clipped to
    /// `max_width` pixels.
    fn text(&mut self, x: usize, y: usize, text: &str, max_width: usize) {
        let advance = GLYPH * TEXT_SCALE;
        for (i, c) in text.chars().enumerate() {
            let left = x + i * advance;
            if left + advance > x + max_width {
                break;
            }
            let glyph = BASIC_LEGACY[if c.is_ascii() { c as usize } else { '?' as usize }];
            for (gy, bits) in glyph.iter().enumerate() {
                for gx in 0..GLYPH {
                    if bits & (1 << gx) != 0 {
                        self.fill(
                            left + gx * TEXT_SCALE,
                            y + gy * TEXT_SCALE,
                            TEXT_SCALE,
                            TEXT_SCALE,
                            BLACK,
                        );
                    }
                }
            }
        }
    }

    /// Copies `rgb` (w x h) scaled up by `scale` (nearest neighbour) to (x, y).
    fn blit(&mut self, x: usize, y: usize, rgb: &[u8], w: usize, h: usize, scale: usize) {
        for row in 0..h * scale {
            for col in 0..w * scale {
                let src = ((row / scale) * w + col / scale) * 3;
                let dst = ((y + row) * self.width + x + col) * 3;
                self.rgb[dst..dst + 3].copy_from_slice(&rgb[src..src + 3]);
            }
        }
    }
}

/// Splits `text` into lines of at most `chars` characters, at spaces where possible.
fn wrap(text: &str, chars: usize) -> Vec<String> {
    let chars = chars.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        while word.chars().count() > chars {
            let head: String = word.chars().take(chars).collect();
            word = word.chars().skip(chars).collect();
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            lines.push(head);
        }
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > chars {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// One cell: an image, why there is none (a setting that failed, drawn grey with the reason), or
/// the image of the column this one equals for the row (a fix its model cannot take; a footnote
/// says why, once).
pub enum Cell {
    Image {
        rgb: Vec<u8>,
        luminance: f64,
    },
    Missing(String),
    /// Another column's image, shown again where this column equals it for the row (a fix the
    /// row's model cannot take), captioned `= LABEL`.
    Repeat {
        rgb: Vec<u8>,
        of: String,
    },
}

/// Lays out `cells` (row-major, rows x columns) of `w` x `h` images with labels, and `notes`
/// under the grid, one paragraph each.
pub fn render(
    column_labels: &[String],
    row_labels: &[String],
    cells: &[Cell],
    (w, h): (usize, usize),
    notes: &[String],
) -> Canvas {
    let scale = MIN_CELL_SIDE.div_ceil(w.max(h)).max(1);
    let (cell_w, cell_h) = (w * scale, h * scale);
    let chars_per_cell = cell_w / (GLYPH * TEXT_SCALE);
    let header_lines = column_labels
        .iter()
        .map(|l| wrap(l, chars_per_cell).len())
        .max()
        .unwrap_or(1);
    let header_h = header_lines * LINE_HEIGHT + PADDING;
    let label_chars = row_labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(4, 24);
    let label_w = label_chars * GLYPH * TEXT_SCALE + 2 * PADDING;
    let caption_h = LINE_HEIGHT + PADDING;
    let (columns, rows) = (column_labels.len(), row_labels.len());
    let width = label_w + columns * (cell_w + PADDING) + PADDING;
    let note_chars = (width - 2 * PADDING) / (GLYPH * TEXT_SCALE);
    let note_lines: Vec<String> = notes.iter().flat_map(|n| wrap(n, note_chars)).collect();
    let grid_h = header_h + rows * (cell_h + caption_h);
    let height = grid_h + note_lines.len() * LINE_HEIGHT + PADDING;
    let mut canvas = Canvas::new(width, height, WHITE);
    for (i, line) in note_lines.iter().enumerate() {
        canvas.text(PADDING, grid_h + i * LINE_HEIGHT, line, width - 2 * PADDING);
    }
    for (c, label) in column_labels.iter().enumerate() {
        let x = label_w + c * (cell_w + PADDING);
        for (i, line) in wrap(label, chars_per_cell).iter().enumerate() {
            canvas.text(x, PADDING / 2 + i * LINE_HEIGHT, line, cell_w);
        }
    }
    for (r, label) in row_labels.iter().enumerate() {
        let y = header_h + r * (cell_h + caption_h);
        for (i, line) in wrap(label, label_chars).iter().take(cell_h / LINE_HEIGHT).enumerate() {
            canvas.text(PADDING, y + i * LINE_HEIGHT, line, label_w - PADDING);
        }
        for c in 0..columns {
            let x = label_w + c * (cell_w + PADDING);
            // A frame in the padding, so that a white image stands out from the page.
            canvas.fill(x - 1, y - 1, cell_w + 2, cell_h + 2, LIGHT_GREY);
            match &cells[r * columns + c] {
                Cell::Image { rgb, luminance } => {
                    canvas.blit(x, y, rgb, w, h, scale);
                    canvas.text(x, y + cell_h + 4, &format!("L={luminance:.3}"), cell_w);
                }
                Cell::Repeat { rgb, of } => {
                    canvas.blit(x, y, rgb, w, h, scale);
                    canvas.text(x, y + cell_h + 4, &format!("= {of}"), cell_w);
                }
                Cell::Missing(why) => {
                    canvas.fill(x, y, cell_w, cell_h, GREY);
                    // The reason's first clause; grid.json keeps the whole message.
                    let short = why.split(':').next().unwrap_or(why);
                    for (i, line) in wrap(short, chars_per_cell)
                        .iter()
                        .take(cell_h / LINE_HEIGHT)
                        .enumerate()
                    {
                        canvas.text(x, y + i * LINE_HEIGHT, line, cell_w);
                    }
                    canvas.text(x, y + cell_h + 4, "n/a", cell_w);
                }
            }
        }
    }
    canvas
}

/// Histogram height in pixels, and the number of bins over 0..1.
const HISTOGRAM_HEIGHT: usize = 200;
pub const HISTOGRAM_BINS: usize = 20;
const BAR_WIDTH: usize = 16;
const BAR: [u8; 3] = [60, 90, 160];
const TITLE_LINES: usize = 3;

/// A bar chart of `values` (each in 0..1) over [`HISTOGRAM_BINS`] equal bins, titled, with the
/// axis ends labelled.
pub fn histogram(values: &[f64], title: &str) -> Canvas {
    let mut counts = [0usize; HISTOGRAM_BINS];
    for v in values {
        let bin = ((v.clamp(0.0, 1.0) * HISTOGRAM_BINS as f64) as usize).min(HISTOGRAM_BINS - 1);
        counts[bin] += 1;
    }
    let peak = counts.iter().copied().max().unwrap_or(0).max(1);
    let plot_w = HISTOGRAM_BINS * BAR_WIDTH;
    let width = plot_w + 2 * PADDING;
    let top = LINE_HEIGHT * TITLE_LINES + PADDING;
    let height = top + HISTOGRAM_HEIGHT + LINE_HEIGHT + 2 * PADDING;
    let mut canvas = Canvas::new(width, height, WHITE);
    let chars = plot_w / (GLYPH * TEXT_SCALE);
    for (i, line) in wrap(title, chars).iter().take(TITLE_LINES).enumerate() {
        canvas.text(PADDING, PADDING / 2 + i * LINE_HEIGHT, line, plot_w);
    }
    for (bin, &count) in counts.iter().enumerate() {
        let bar_h = count * HISTOGRAM_HEIGHT / peak;
        let x = PADDING + bin * BAR_WIDTH;
        canvas.fill(x + 1, top + HISTOGRAM_HEIGHT - bar_h, BAR_WIDTH - 2, bar_h, BAR);
    }
    canvas.fill(PADDING, top + HISTOGRAM_HEIGHT, plot_w, 1, BLACK);
    let axis_y = top + HISTOGRAM_HEIGHT + 4;
    canvas.text(PADDING, axis_y, "0", plot_w);
    canvas.text(PADDING + plot_w / 2 - GLYPH * TEXT_SCALE, axis_y, "0.5", plot_w / 2);
    canvas.text(PADDING + plot_w - GLYPH * TEXT_SCALE, axis_y, "1", GLYPH * TEXT_SCALE);
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_and_splits_long_ones() {
        assert_eq!(wrap("+rescaled CFG", 9), ["+rescaled", "CFG"]);
        assert_eq!(wrap("a b c", 3), ["a b", "c"]);
        assert_eq!(wrap("abcdefgh", 3), ["abc", "def", "gh"]);
    }

    #[test]
    fn histogram_bars_follow_the_counts() {
        let canvas = histogram(&[0.01, 0.02, 0.03, 0.99], "two clusters");
        let column_has_bar = |bin: usize| {
            let x = PADDING + bin * BAR_WIDTH + BAR_WIDTH / 2;
            (0..canvas.height)
                .filter(|&y| canvas.rgb[(y * canvas.width + x) * 3..][..3] == BAR)
                .count()
        };
        assert_eq!(column_has_bar(0), HISTOGRAM_HEIGHT);
        assert_eq!(column_has_bar(HISTOGRAM_BINS - 1), HISTOGRAM_HEIGHT / 3);
        assert_eq!(column_has_bar(10), 0);
    }

    #[test]
    fn text_marks_pixels_and_cells_keep_their_colours() {
        let cells = vec![
            Cell::Image {
                rgb: vec![10; 4 * 4 * 3],
                luminance: 0.04,
            },
            Cell::Missing("epsilon".into()),
            Cell::Repeat {
                rgb: vec![30; 4 * 4 * 3],
                of: "baseline".into(),
            },
        ];
        let canvas = render(
            &["baseline".into(), "+zero-SNR".into(), "+trailing".into()],
            &["seed 1".into()],
            &cells,
            (4, 4),
            &[],
        );
        assert_eq!(canvas.rgb.len(), canvas.width * canvas.height * 3);
        let dark = canvas.rgb.chunks(3).filter(|p| p == &[0, 0, 0]).count();
        assert!(dark > 100, "labels drew {dark} black pixels");
        assert!(canvas.rgb.chunks(3).any(|p| p == [10, 10, 10]));
        assert!(canvas.rgb.chunks(3).any(|p| p == [30, 30, 30]));
        assert!(canvas.rgb.chunks(3).any(|p| p == GREY));
        assert!(canvas.rgb.chunks(3).any(|p| p == LIGHT_GREY));
    }

    #[test]
    fn notes_go_under_the_grid() {
        let cells = [Cell::Image {
            rgb: vec![10; 4 * 4 * 3],
            luminance: 0.04,
        }];
        let labels = (["baseline".to_string()], ["seed 1".to_string()]);
        let plain = render(&labels.0, &labels.1, &cells, (4, 4), &[]);
        let noted = render(&labels.0, &labels.1, &cells, (4, 4), &["a note ".repeat(20)]);
        assert_eq!(noted.width, plain.width);
        assert!(
            noted.height >= plain.height + 2 * LINE_HEIGHT,
            "{} vs {}",
            noted.height,
            plain.height
        );
        let below = &noted.rgb[plain.height * noted.width * 3..];
        assert!(below.chunks(3).any(|p| p == BLACK));
    }
}

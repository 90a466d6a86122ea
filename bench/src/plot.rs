//! The scaling plot as a PNG, with no dependencies: an RGB canvas, lines,
//! a 3×5 pixel font, and a PNG writer using stored (uncompressed) deflate
//! blocks, so only CRC-32 and Adler-32 are needed.

use std::path::Path;

use anyhow::Result;

use crate::scenario::scaling::ScaleRow;

/// An RGB image.
#[derive(Debug, Clone)]
pub struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

type Rgb = [u8; 3];

const GLYPHS: &[(char, [u8; 5])] = &[
    ('0', [7, 5, 5, 5, 7]),
    ('1', [2, 6, 2, 2, 7]),
    ('2', [7, 1, 7, 4, 7]),
    ('3', [7, 1, 7, 1, 7]),
    ('4', [5, 5, 7, 1, 1]),
    ('5', [7, 4, 7, 1, 7]),
    ('6', [7, 4, 7, 5, 7]),
    ('7', [7, 1, 1, 1, 1]),
    ('8', [7, 5, 7, 5, 7]),
    ('9', [7, 5, 7, 1, 7]),
    ('a', [2, 5, 7, 5, 5]),
    ('b', [6, 5, 6, 5, 6]),
    ('c', [3, 4, 4, 4, 3]),
    ('d', [6, 5, 5, 5, 6]),
    ('e', [7, 4, 6, 4, 7]),
    ('f', [7, 4, 6, 4, 4]),
    ('g', [3, 4, 5, 5, 3]),
    ('h', [5, 5, 7, 5, 5]),
    ('i', [7, 2, 2, 2, 7]),
    ('j', [1, 1, 1, 5, 2]),
    ('k', [5, 5, 6, 5, 5]),
    ('l', [4, 4, 4, 4, 7]),
    ('m', [5, 7, 7, 5, 5]),
    ('n', [6, 5, 5, 5, 5]),
    ('o', [2, 5, 5, 5, 2]),
    ('p', [6, 5, 6, 4, 4]),
    ('q', [2, 5, 5, 3, 1]),
    ('r', [6, 5, 6, 5, 5]),
    ('s', [3, 4, 2, 1, 6]),
    ('t', [7, 2, 2, 2, 2]),
    ('u', [5, 5, 5, 5, 7]),
    ('v', [5, 5, 5, 5, 2]),
    ('w', [5, 5, 7, 7, 5]),
    ('x', [5, 5, 2, 5, 5]),
    ('y', [5, 5, 2, 2, 2]),
    ('z', [7, 1, 2, 4, 7]),
    ('.', [0, 0, 0, 0, 2]),
    ('/', [1, 1, 2, 4, 4]),
    ('-', [0, 0, 7, 0, 0]),
    ('^', [2, 5, 0, 0, 0]),
    (',', [0, 0, 0, 2, 4]),
    ('(', [2, 4, 4, 4, 2]),
    (')', [2, 1, 1, 1, 2]),
    ('=', [0, 7, 0, 7, 0]),
    (':', [0, 2, 0, 2, 0]),
];

impl Canvas {
    /// A white canvas.
    pub fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A filled rectangle.
    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// A line `t` pixels thick.
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), t: i64, c: Rgb) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for s in 0..=steps {
            let x = x0 + (x1 - x0) * s / steps;
            let y = y0 + (y1 - y0) * s / steps;
            self.rect(x - t / 2, y - t / 2, t, t, c);
        }
    }

    /// Text in the 3×5 font scaled by `k`; returns its width.
    pub fn text(&mut self, x: i64, y: i64, s: &str, k: i64, c: Rgb) -> i64 {
        let mut cx = x;
        for ch in s.chars().map(|c| c.to_ascii_lowercase()) {
            if let Some((_, rows)) = GLYPHS.iter().find(|(g, _)| *g == ch) {
                for (r, bits) in rows.iter().enumerate() {
                    for col in 0..3 {
                        if bits & (4 >> col) != 0 {
                            self.rect(cx + col * k, y + r as i64 * k, k, k, c);
                        }
                    }
                }
            }
            cx += 4 * k;
        }
        cx - x
    }

    /// The PNG encoding (8-bit RGB, no interlace).
    pub fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.w * 3 + 1) * self.h);
        for row in self.px.chunks(self.w * 3) {
            raw.push(0);
            raw.extend_from_slice(row);
        }
        let mut z = vec![0x78, 0x01];
        let mut blocks = raw.chunks(65_535).peekable();
        while let Some(b) = blocks.next() {
            z.push(u8::from(blocks.peek().is_none()));
            let len = b.len() as u16;
            z.extend_from_slice(&len.to_le_bytes());
            z.extend_from_slice(&(!len).to_le_bytes());
            z.extend_from_slice(b);
        }
        z.extend_from_slice(&adler32(&raw).to_be_bytes());
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [(b"IHDR", &ihdr), (b"IDAT", &z), (b"IEND", &Vec::new())] {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let crc = crc32(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        }
        out
    }
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65_521;
        b %= 65_521;
    }
    (b << 16) | a
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Reads one measurement from a row.
type Metric = fn(&ScaleRow) -> f64;

const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [200, 200, 200];
const COLOURS: [Rgb; 5] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
];

/// A panel: x is log10(entries), y linear or log10.
struct Panel {
    x: i64,
    y: i64,
    w: i64,
    h: i64,
    xr: (f64, f64),
    yr: (f64, f64),
    log_y: bool,
}

impl Panel {
    /// A 300×320 panel whose left edge is at `x`, below the 50 px title band.
    fn new(x: i64, xr: (f64, f64), yr: (f64, f64), log_y: bool) -> Self {
        Self {
            x,
            y: 50,
            w: 300,
            h: 320,
            xr,
            yr,
            log_y,
        }
    }

    fn at(&self, xv: f64, yv: f64) -> (i64, i64) {
        let xv = xv.max(1.0).log10();
        let yv = if self.log_y { yv.max(1e-9).log10() } else { yv };
        let fx = (xv - self.xr.0) / (self.xr.1 - self.xr.0);
        let fy = (yv - self.yr.0) / (self.yr.1 - self.yr.0);
        (
            self.x + (fx * self.w as f64) as i64,
            self.y + self.h - (fy.clamp(0.0, 1.0) * self.h as f64) as i64,
        )
    }

    fn frame(&self, c: &mut Canvas, title: &str, ticks: &[(f64, String)], rows: &[ScaleRow]) {
        c.line((self.x, self.y), (self.x, self.y + self.h), 2, BLACK);
        c.line(
            (self.x, self.y + self.h),
            (self.x + self.w, self.y + self.h),
            2,
            BLACK,
        );
        c.text(self.x, self.y - 22, title, 2, BLACK);
        for (v, label) in ticks {
            let (_, y) = self.at(10f64.powf(self.xr.0), *v);
            c.line((self.x, y), (self.x + self.w, y), 1, GREY);
            let lw = label.len() as i64 * 8;
            c.text(self.x - lw - 6, y - 5, label, 2, BLACK);
        }
        for r in rows {
            let (x, _) = self.at(r.entries as f64, 0.0);
            c.line((x, self.y + self.h), (x, self.y + self.h + 6), 2, BLACK);
            let label = format!("10^{:.0}", (r.entries as f64).log10());
            c.text(x - 16, self.y + self.h + 12, &label, 2, BLACK);
        }
        c.text(
            self.x + self.w / 2 - 60,
            self.y + self.h + 32,
            "log entries",
            2,
            BLACK,
        );
    }

    fn series(&self, c: &mut Canvas, pts: &[(f64, f64)], colour: Rgb) {
        let p: Vec<(i64, i64)> = pts.iter().map(|&(x, y)| self.at(x, y)).collect();
        for w in p.windows(2) {
            c.line(w[0], w[1], 3, colour);
        }
        for &(x, y) in &p {
            c.rect(x - 4, y - 4, 9, 9, colour);
        }
    }
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.0}m", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Draws Append throughput (left) and read-side latencies (right) against
/// log size, and writes the PNG to `path`.
pub fn scaling_png(rows: &[ScaleRow], path: &Path) -> Result<()> {
    let mut c = Canvas::new(1060, 460);
    if rows.is_empty() {
        std::fs::write(path, c.png())?;
        return Ok(());
    }
    let xs: Vec<f64> = rows.iter().map(|r| (r.entries as f64).log10()).collect();
    let lo = xs.iter().copied().fold(f64::MAX, f64::min) - 0.3;
    let hi = xs.iter().copied().fold(f64::MIN, f64::max) + 0.3;
    let max_tp = rows.iter().map(|r| r.append_per_s).fold(1.0, f64::max) * 1.15;
    let left = Panel::new(90, (lo, hi), (0.0, max_tp), false);
    let ticks: Vec<(f64, String)> = (0..=4)
        .map(|i| {
            let v = max_tp * f64::from(i) / 4.0;
            (v, short(v))
        })
        .collect();
    left.frame(&mut c, "append events/s", &ticks, rows);
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.entries as f64, r.append_per_s))
        .collect();
    left.series(&mut c, &pts, COLOURS[0]);

    let series: [(&str, Metric); 5] = [
        ("checkpoint", |r| r.checkpoint_p50_us),
        ("inclusion proof", |r| r.inclusion_p50_us),
        ("consistency proof", |r| r.consistency_p50_us),
        ("query 100 newest", |r| {
            r.query("newest").map_or(0.0, |q| q.p50_us)
        }),
        ("query by account", |r| {
            r.query("account").map_or(0.0, |q| q.p50_us)
        }),
    ];
    let all: Vec<f64> = rows
        .iter()
        .flat_map(|r| series.iter().map(move |(_, f)| f(r)))
        .filter(|v| *v > 0.0)
        .collect();
    let ymin = all.iter().copied().fold(f64::MAX, f64::min).log10().floor();
    let ymax = all.iter().copied().fold(1.0, f64::max).log10().ceil();
    let right = Panel::new(540, (lo, hi), (ymin, ymax.max(ymin + 1.0)), true);
    let ticks: Vec<(f64, String)> = (ymin as i32..=ymax as i32)
        .map(|e| (10f64.powi(e), short(10f64.powi(e))))
        .collect();
    right.frame(&mut c, "p50 latency us (log)", &ticks, rows);
    for (i, (name, f)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = rows.iter().map(|r| (r.entries as f64, f(r))).collect();
        right.series(&mut c, &pts, COLOURS[i]);
        let y = 60 + i as i64 * 22;
        c.rect(860, y, 14, 10, COLOURS[i]);
        c.text(880, y, name, 2, BLACK);
    }
    std::fs::write(path, c.png())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn png_has_signature_and_chunks() {
        let png = Canvas::new(3, 2).png();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.windows(4).any(|w| w == b"IDAT"));
        assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]));
    }
}

//! `pause.png` / `transfer.png` / `stand-in.png`: p50 stopped span against guest RAM size (log₂ axis) for 1 vCPU, one line per page
//! size and RAM use, with bars from the smallest sample to the p99. Pure-Rust drawing
//! (plotters' bitmap backend, text through ab_glyph with the DejaVu Sans bytes compiled in).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::config::{size_label, Series};
use crate::error::{Error, Result};
use crate::results::ConfigResult;

const SIZE: (u32, u32) = (900, 560);
const FONT: &str = "sans-serif";

/// One plotted point: RAM (MiB), min, p50, p99 pause (ms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// Smallest pause.
    pub min: f64,
    /// Median pause.
    pub p50: f64,
    /// 99th percentile pause.
    pub p99: f64,
}

/// The 1-vCPU points of `series`, by RAM size.
pub fn points(configs: &[ConfigResult], series: Series) -> Vec<Point> {
    let mut v: Vec<Point> = configs
        .iter()
        .filter(|c| c.config.vcpus == 1 && c.config.series() == series)
        .filter_map(|c| {
            let s = c.stopped()?;
            Some(Point {
                mem_mib: c.config.mem_mib,
                min: s.min,
                p50: s.p50,
                p99: s.p99,
            })
        })
        .collect();
    v.sort_by_key(|p| p.mem_mib);
    v
}

fn colour(i: usize) -> RGBColor {
    [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ][i % 4]
}

/// Draws the plot of `configs` into `path`.
pub fn draw(configs: &[ConfigResult], title: &str, path: &Path) -> Result<()> {
    let err = |e: String| Error::Plot {
        path: path.to_path_buf(),
        why: e,
    };
    // Registering twice is harmless (the second replaces the first).
    for style in [FontStyle::Normal, FontStyle::Bold] {
        register_font(FONT, style, dejavu::sans::regular())
            .map_err(|_| err("the DejaVu Sans font does not parse".into()))?;
    }
    let series: Vec<(Series, Vec<Point>)> = Series::ALL
        .iter()
        .map(|&s| (s, points(configs, s)))
        .collect();
    let all = series.iter().flat_map(|(_, p)| p.iter());
    let y_max = all.clone().map(|p| p.p99).fold(1.0, f64::max) * 1.1;
    // The x range covers the measured RAM sizes (256 MiB … 8 GiB by default).
    let mut keys: Vec<f64> = all.map(|p| (p.mem_mib as f64).log2()).collect();
    if keys.is_empty() {
        keys = vec![8.0, 10.0, 12.0];
    }
    keys.sort_by(f64::total_cmp);
    keys.dedup();
    let x_lo = keys[0].min(8.0) - 0.4;
    let x_hi = keys[keys.len() - 1].max(12.0) + 0.4;

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22).into_font())
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(64)
        .build_cartesian_2d(x_lo..x_hi, 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("guest RAM (log scale)")
        .y_desc("stopped span (vCPUs stopped → running), p50 (ms)")
        .x_labels((x_hi - x_lo).ceil() as usize + 1)
        .x_label_formatter(&|x| {
            // Label whole powers of two only (the axis is log2 of MiB).
            if (x - x.round()).abs() < 1e-6 {
                size_label(2f64.powf(x.round()) as u64)
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 15).into_font())
        .axis_desc_style((FONT, 17).into_font())
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(e.to_string()))?;

    for (i, (s, pts)) in series.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let c = colour(i);
        // Shift each series a little sideways so the bars do not hide each other.
        let dx = (i as f64 - 1.5) * 0.05;
        let xy = |p: &Point| ((p.mem_mib as f64).log2() + dx, p.p50);
        chart
            .draw_series(LineSeries::new(pts.iter().map(xy), c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(xy(p), 4, c.filled())))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(pts.iter().map(|p| {
                let (x, y) = xy(p);
                ErrorBar::new_vertical(x, p.min, y, p.p99, c.stroke_width(1), 8)
            }))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 15).into_font())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.draw(&Text::new(
        "points: p50 · bars: min to p99 · 1 vCPU",
        (SIZE.0 as i32 - 300, SIZE.1 as i32 - 22),
        (FONT, 13).into_font().color(&BLACK.mix(0.7)),
    ))
    .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Pages;
    use crate::results::fake::result;

    #[test]
    fn draws_a_png() {
        let configs = vec![
            result(256, Pages::Small, true, &[6.0, 7.0, 9.0]),
            result(1024, Pages::Small, true, &[9.0, 11.0, 14.0]),
            result(256, Pages::Huge, false, &[3.0, 4.0]),
            result(1024, Pages::Huge, false, &[3.5, 4.0]),
        ];
        assert_eq!(points(&configs, Series::ALL[1]).len(), 2);
        assert!(points(&configs, Series::ALL[0]).is_empty());
        let dir = std::env::temp_dir().join(format!("molt-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("pause.png");
        draw(&configs, "test", &p).unwrap();
        let png = std::fs::read(&p).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // IHDR width and height.
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), SIZE.0);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), SIZE.1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

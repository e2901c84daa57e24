//! A series of (x, y) points in bounded memory, for the dashboard's charts of long runs.
//!
//! A [`Series`] holds at most `cap` points. When it is full, neighbours are merged in pairs
//! (their mean, with the minimum and maximum kept) and from then on every point stands for
//! twice as many raw ones as before (its `stride`), so the whole run stays evenly resolved: a
//! million steps fit in `cap` points, each the mean of the same number of steps. A raw point
//! whose x is not past the last one (a step trained again after a recovery rolled back) first
//! drops the points from that x on: the chart shows the run the model went through.

use serde::Serialize;

/// One point: the mean of `n` raw points, and the range of their y.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Mean x of the raw points (tokens trained, or seconds).
    pub x: f64,
    /// Mean y.
    pub y: f64,
    pub min: f64,
    pub max: f64,
    /// Raw points merged into this one.
    pub n: u64,
    /// x of the first raw point, for the roll-back.
    #[serde(skip)]
    first: f64,
}

impl Point {
    fn raw(x: f64, y: f64) -> Self {
        Point {
            x,
            y,
            min: y,
            max: y,
            n: 1,
            first: x,
        }
    }

    /// The point with its y (mean, minimum, maximum) times `k` (k > 0), e.g. a fraction as a
    /// percentage.
    pub fn scaled(self, k: f64) -> Point {
        Point {
            y: self.y * k,
            min: self.min * k,
            max: self.max * k,
            ..self
        }
    }

    fn merge(a: Point, b: Point) -> Point {
        let n = a.n + b.n;
        let (wa, wb) = (a.n as f64 / n as f64, b.n as f64 / n as f64);
        Point {
            x: a.x * wa + b.x * wb,
            y: a.y * wa + b.y * wb,
            min: a.min.min(b.min),
            max: a.max.max(b.max),
            n,
            first: a.first.min(b.first),
        }
    }
}

/// At most `cap` points, evenly downsampled (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Series {
    cap: usize,
    /// Raw points per stored point.
    stride: u64,
    points: Vec<Point>,
    /// Raw points gathered for the next stored point (fewer than `stride`).
    pending: Option<Point>,
    /// x of the last raw point.
    last_x: Option<f64>,
}

impl Series {
    /// An empty series of at most `cap` points (`cap` at least 2).
    pub fn new(cap: usize) -> Self {
        Series {
            cap: cap.max(2),
            stride: 1,
            points: Vec::new(),
            pending: None,
            last_x: None,
        }
    }

    /// Adds a raw point. A non-finite one is ignored (it is never trained on, and JSON cannot
    /// say it); one at or before the last x replaces the points from its x on.
    pub fn push(&mut self, x: f64, y: f64) {
        if !x.is_finite() || !y.is_finite() {
            return;
        }
        if self.last_x.is_some_and(|last| x <= last) {
            self.points.retain(|p| p.first < x);
            if self.pending.is_some_and(|p| p.first >= x) {
                self.pending = None;
            }
        }
        self.last_x = Some(x);
        let point = match self.pending.take() {
            Some(p) => Point::merge(p, Point::raw(x, y)),
            None => Point::raw(x, y),
        };
        if point.n < self.stride {
            self.pending = Some(point);
            return;
        }
        self.points.push(point);
        if self.points.len() >= self.cap {
            self.points = self
                .points
                .chunks(2)
                .filter_map(|pair| pair.iter().copied().reduce(Point::merge))
                .collect();
            self.stride *= 2;
        }
    }

    /// The points, oldest first, the partly gathered one included.
    pub fn points(&self) -> Vec<Point> {
        let mut out = self.points.clone();
        out.extend(self.pending);
        out
    }

    /// The newest raw point's x, if any.
    pub fn last_x(&self) -> Option<f64> {
        self.last_x
    }

    /// Whether nothing was pushed (or everything was rolled back).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty() && self.pending.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_series_keeps_every_point() {
        let mut s = Series::new(8);
        for i in 0..5 {
            s.push(f64::from(i), f64::from(i * 10));
        }
        let p = s.points();
        assert_eq!(p.len(), 5);
        assert_eq!((p[4].x, p[4].y, p[4].n), (4.0, 40.0, 1));
    }

    #[test]
    fn a_long_series_stays_under_its_cap_evenly_and_keeps_mean_and_range() {
        let cap = 100;
        let mut s = Series::new(cap);
        let total = 1_000_000u64;
        let mut sum = 0.0;
        for i in 0..total {
            let y = (i as f64 * 0.01).sin() + i as f64 * 1e-6;
            sum += y;
            s.push(i as f64, y);
            assert!(s.points().len() <= cap, "at {i}: {}", s.points().len());
        }
        let p = s.points();
        assert!(p.len() >= cap / 2, "{}", p.len());
        // Every stored point but the partly gathered last one stands for the same number of
        // raw points: the run is evenly resolved.
        let n = p[0].n;
        assert!(p[..p.len() - 1].iter().all(|q| q.n == n), "{p:?}");
        assert_eq!(p.iter().map(|q| q.n).sum::<u64>(), total);
        // The means of the merged points give back the mean of the raw ones.
        let mean: f64 = p.iter().map(|q| q.y * q.n as f64).sum::<f64>() / total as f64;
        assert!((mean - sum / total as f64).abs() < 1e-9);
        // The range of the raw y survives merging.
        let lo = p.iter().map(|q| q.min).fold(f64::INFINITY, f64::min);
        let hi = p.iter().map(|q| q.max).fold(f64::NEG_INFINITY, f64::max);
        assert!(lo < -0.99 && hi > 1.99, "{lo} {hi}");
        // x stays increasing, from the start to the end of the run.
        assert!(p.windows(2).all(|w| w[0].x < w[1].x));
        assert!(p[0].x < n as f64 && p[p.len() - 1].x > (total - n) as f64);
    }

    #[test]
    fn a_step_trained_again_replaces_the_points_from_its_x_on() {
        let mut s = Series::new(100);
        for i in 1..=10 {
            s.push(f64::from(i), 1.0);
        }
        // Rolled back to step 6: steps 7.. are trained again.
        s.push(7.0, 2.0);
        s.push(8.0, 2.0);
        let p = s.points();
        let xs: Vec<f64> = p.iter().map(|q| q.x).collect();
        assert_eq!(xs, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        assert_eq!(p[6].y, 2.0);
        assert_eq!(s.last_x(), Some(8.0));
    }

    #[test]
    fn non_finite_values_are_not_kept() {
        let mut s = Series::new(4);
        s.push(1.0, f64::NAN);
        s.push(f64::INFINITY, 1.0);
        assert!(s.is_empty());
    }
}

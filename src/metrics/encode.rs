//! Writing metric families with `prometheus-client`'s OpenMetrics encoder from values read
//! at scrape time (a [`Collector`] over one status snapshot).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::histogram::HistogramSnapshot;

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Encodes the metric families `write` produces as one OpenMetrics text exposition.
pub fn exposition<F>(write: F) -> String
where
    F: Fn(&mut Families<'_>) -> std::fmt::Result + Send + Sync + 'static,
{
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(write)));
    let mut out = String::new();
    // Writing to a String cannot fail; an encoding error would be a bug in a family.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

struct Snapshot<F>(F);

impl<F> std::fmt::Debug for Snapshot<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("metrics snapshot")
    }
}

impl<F> Collector for Snapshot<F>
where
    F: Fn(&mut Families<'_>) -> std::fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut families = Families { enc: encoder };
        (self.0)(&mut families)
    }
}

/// Writes one metric family at a time. Names carry their unit (`_seconds`, `_bytes`);
/// a counter's samples get `_total` appended by the encoder.
pub struct Families<'e> {
    enc: DescriptorEncoder<'e>,
}

impl Families<'_> {
    /// A gauge with one sample per label set.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Labels<'_>, f64)],
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            m.encode_family(labels)?.encode_gauge(v)?;
        }
        Ok(())
    }

    /// A gauge with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, v: f64) -> std::fmt::Result {
        self.gauges(name, help, &[(&[], v)])
    }

    /// A counter (`name` without `_total`) with one sample per label set.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Labels<'_>, u64)],
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            m.encode_family(labels)?
                .encode_counter::<NoLabelSet, u64, u64>(v, None::<&Exemplar<NoLabelSet, u64>>)?;
        }
        Ok(())
    }

    /// A counter with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        self.counters(name, help, &[(&[], v)])
    }

    /// A histogram with one series per label set.
    pub fn histograms(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Labels<'_>, &HistogramSnapshot)],
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in samples {
            // The encoder takes per-bucket counts and adds them up itself.
            let mut buckets = Vec::with_capacity(h.buckets.len() + 1);
            let mut below = 0;
            for &(bound, cumulative) in &h.buckets {
                buckets.push((bound, cumulative.saturating_sub(below)));
                below = below.max(cumulative);
            }
            buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
            m.encode_family(labels)?.encode_histogram::<NoLabelSet>(
                h.sum_seconds,
                h.count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }

    /// A histogram with one unlabelled series.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) -> std::fmt::Result {
        self.histograms(name, help, &[(&[], h)])
    }
}

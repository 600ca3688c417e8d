//! SENSEI (Gao, Saha, Prasad & Roychoudhury, ICSE 2020, "Fuzz Testing based Data Augmentation
//! to Improve Robustness of Deep Neural Networks"): per training image, a genetic search over
//! natural transformations picks the variant with the highest loss under the current model, and
//! the population is kept across epochs so the search continues where it stopped
//! ("locally worst" variant of one epoch seeds the next). SENSEI-SA adds *selective
//! augmentation*: an image whose worst variant is already point-wise robust (loss below a
//! threshold) skips the search for that epoch.
//!
//! Parameters follow the authors' code (github.com/gaoxiang9430/sensei,
//! `augment/config.py`, `ga_selector.py`, `transformation.py`, `augmented_training.py`,
//! `data_generator.py`); see [`SenseiConfig::default`] for each value and its source.
//!
//! One generation per image per epoch, as in the reference:
//! 1. first visit: the initial population (the identity plus random transforms) is evaluated;
//! 2. later visits: the kept population (the `survivors` highest-loss transforms of the previous
//!    visit) plus `children` new ones, made by mutation of the top transform (probability
//!    `mutation_prob`) or else by crossover of the top transform with the kept transform that
//!    differs from it in the most genes;
//! 3. every candidate is evaluated by the caller's model ([`sensei_select`]'s `fitness`); the
//!    highest-loss variant is the training image; the population is sorted by loss and cut to
//!    `survivors`.
//!
//! Deviations from the reference code, all deliberate:
//! - the transforms are applied inside the frame (black fill), sizes kept: the reference
//!   rotates with `imutils.rotate_bound` (canvas grows), crops sheared columns and resizes for
//!   zoom, then centre-crops to a square and resizes back to 32×32 (`cv2_preprocess_img`);
//! - mutation-vs-crossover is drawn per image (the reference draws once per batch);
//! - a robust image's loss is re-measured on its current worst variant each epoch, so it can
//!   leave the robust set (the reference overwrites that loss with a placeholder 0, which keeps
//!   it robust for good);
//! - the reference's per-class-pair cap (switch to the second-worst variant once a
//!   true→predicted pair was chosen > 1000 times in an epoch) and its CIFAR horizontal flip of
//!   the base image are left to the trainer (the flip is ordinary augmentation).

use rand::seq::index::sample;
use rand::Rng;

use crate::augmix_ops::{affine_bilinear, apply, Op};
use crate::ImageRef;

/// The number of genes in a [`Transform`].
pub const NUM_GENES: usize = 7;

/// One chromosome: the parameters of SENSEI's transformations, applied in the reference order
/// rotate → translate → shear → zoom → brightness → contrast.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transform {
    /// Degrees, counter-clockwise about the centre (PIL's rotate, bilinear, black fill).
    pub rotate_deg: f64,
    /// Pixels (integers on the default grid); PIL's affine translate (exact for integers).
    pub translate_x: f64,
    pub translate_y: f64,
    /// Horizontal shear factor (PIL's affine `[1, s, 0; 0, 1, 0]`).
    pub shear: f64,
    /// Scale about the centre: > 1 zooms in, < 1 zooms out (black border).
    pub zoom: f64,
    /// Added to every channel, then clipped to [0, 255] (reference `image_brightness`).
    pub brightness: f64,
    /// `(v − 127)·c + 127`, clipped, truncated (reference `image_contrast`).
    pub contrast: f64,
}

impl Transform {
    pub const IDENTITY: Transform = Transform {
        rotate_deg: 0.0,
        translate_x: 0.0,
        translate_y: 0.0,
        shear: 0.0,
        zoom: 1.0,
        brightness: 0.0,
        contrast: 1.0,
    };

    /// Genes in the reference's crossover/mutation order: rotation, translate x, translate y,
    /// shear, brightness, contrast, zoom.
    pub fn genes(&self) -> [f64; NUM_GENES] {
        [
            self.rotate_deg,
            self.translate_x,
            self.translate_y,
            self.shear,
            self.brightness,
            self.contrast,
            self.zoom,
        ]
    }

    pub fn from_genes(g: [f64; NUM_GENES]) -> Self {
        Transform {
            rotate_deg: g[0],
            translate_x: g[1],
            translate_y: g[2],
            shear: g[3],
            brightness: g[4],
            contrast: g[5],
            zoom: g[6],
        }
    }

    /// Gene-wise equality up to float noise (the duplicate check of the reference's
    /// `mutate_node`).
    pub fn same_as(&self, other: &Transform) -> bool {
        self.differing_genes(other) == 0
    }

    /// How many genes differ (the reference's `compare_paras`).
    pub fn differing_genes(&self, other: &Transform) -> usize {
        self.genes()
            .iter()
            .zip(other.genes())
            .filter(|(a, b)| (*a - b).abs() > 1e-9)
            .count()
    }
}

impl Default for Transform {
    fn default() -> Self {
        Transform::IDENTITY
    }
}

/// The values a gene may take: `[min, max]` on a grid of `grid` around `centre` (the identity
/// value), and the mutation step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeneRange {
    pub min: f64,
    pub max: f64,
    pub grid: f64,
    /// The identity value; the "reflect" mutation maps v to 2·centre − v.
    pub centre: f64,
    /// The mutation step (± step).
    pub step: f64,
}

impl GeneRange {
    /// Snaps to the grid and clamps to the range.
    pub fn fit(&self, v: f64) -> f64 {
        let snapped = self.centre + ((v - self.centre) / self.grid).round() * self.grid;
        snapped.clamp(self.min, self.max)
    }

    /// Whether `v` is in the range and on its grid.
    pub fn contains(&self, v: f64) -> bool {
        let k = (v - self.centre) / self.grid;
        v >= self.min - 1e-9 && v <= self.max + 1e-9 && (k - k.round()).abs() < 1e-6
    }

    fn random(&self, rng: &mut impl Rng) -> f64 {
        let lo = ((self.min - self.centre) / self.grid).round() as i64;
        let hi = ((self.max - self.centre) / self.grid).round() as i64;
        self.fit(self.centre + rng.random_range(lo..=hi) as f64 * self.grid)
    }
}

/// SENSEI's configuration. [`Default`] gives the six-transformation setting (SENSEI,
/// not SENSEI-SA) for 32×32 images; set `selective` for SENSEI-SA.
#[derive(Clone, Debug, PartialEq)]
pub struct SenseiConfig {
    pub rotate_deg: GeneRange,
    /// Both translation axes, in pixels.
    pub translate: GeneRange,
    pub shear: GeneRange,
    pub zoom: GeneRange,
    pub brightness: GeneRange,
    pub contrast: GeneRange,
    /// Whether zoom, brightness and contrast are searched ("filter" transformations, the
    /// reference's `-f`); off leaves them at identity and searches the first four genes only.
    pub filters: bool,
    /// Transforms kept from one epoch to the next (reference `queue_len`).
    pub survivors: usize,
    /// New transforms per generation (reference `popsize`).
    pub children: usize,
    /// The first population's size, the identity included.
    pub initial_population: usize,
    /// Probability of making the children by mutation rather than crossover.
    pub mutation_prob: f64,
    /// Genes changed by one mutation (of the active ones).
    pub genes_mutated: usize,
    /// Below this top loss, the rotation and shear mutation steps double.
    pub coarse_step_below_loss: f32,
    /// SENSEI-SA: skip the search for point-wise robust images.
    pub selective: bool,
    /// Point-wise robustness: the worst variant's loss below this.
    pub robust_threshold: f32,
}

impl Default for SenseiConfig {
    /// Sources, all in the authors' repository (the paper's own text was not at hand here):
    /// `augment/config.py` (C), `augment/augmented_training.py` CLI defaults (A),
    /// `doc/experiment_config.md` (D), `ga_selector.py`/`transformation.py` (named).
    fn default() -> Self {
        SenseiConfig {
            // C, D: rotation [−30°, 30°], 1° grid, step 6.
            rotate_deg: GeneRange {
                min: -30.0,
                max: 30.0,
                grid: 1.0,
                centre: 0.0,
                step: 6.0,
            },
            // D: at most 10% of the pixels; C: [−3, 3] px for 32-px images, step 1.
            translate: GeneRange {
                min: -3.0,
                max: 3.0,
                grid: 1.0,
                centre: 0.0,
                step: 1.0,
            },
            // C, D: shear [−0.1, 0.1], grid 0.005, step 0.02.
            shear: GeneRange {
                min: -0.1,
                max: 0.1,
                grid: 0.005,
                centre: 0.0,
                step: 0.02,
            },
            // C, D: zoom [0.9, 1.1], grid 0.01, step 0.02.
            zoom: GeneRange {
                min: 0.9,
                max: 1.1,
                grid: 0.01,
                centre: 1.0,
                step: 0.02,
            },
            // C, D: brightness [−32, 32], grid 2, step 4.
            brightness: GeneRange {
                min: -32.0,
                max: 32.0,
                grid: 2.0,
                centre: 0.0,
                step: 4.0,
            },
            // C, D: contrast [0.8, 1.2], grid 0.025, step 0.05.
            contrast: GeneRange {
                min: 0.8,
                max: 1.2,
                grid: 0.025,
                centre: 1.0,
                step: 0.05,
            },
            // Our choice: the six-transformation setting (A: `-f`, run.sh's `st`); C's default is
            // off (rotation, translation, shear only).
            filters: true,
            // A: `-q 10` → queue_len = int(0.4·10) = 4, popsize = 10 − 4 = 6: ten candidates
            // per image per epoch.
            survivors: 4,
            children: 6,
            // `GASelect.__init__`: the original image plus 9 random transforms.
            initial_population: 10,
            // C: prob_mutate = 0.6 (crossover otherwise).
            mutation_prob: 0.6,
            // `generate_mutated_node`: 4 of 7 genes with filters (2 of 4 without).
            genes_mutated: 4,
            // `Transformation.mutate/crossover`: loss < 1e-3 → rotation step 12, shear 0.04.
            coarse_step_below_loss: 1e-3,
            // SENSEI; SENSEI-SA sets this (A: `-o`).
            selective: false,
            // A: `-r 3` → 0.1³ = 1e-3, the loss threshold of selective augmentation.
            robust_threshold: 1e-3,
        }
    }
}

impl SenseiConfig {
    /// SENSEI-SA: the default with selective augmentation on.
    pub fn selective() -> Self {
        SenseiConfig {
            selective: true,
            ..Self::default()
        }
    }

    /// The gene ranges in [`Transform::genes`] order.
    pub fn ranges(&self) -> [GeneRange; NUM_GENES] {
        [
            self.rotate_deg,
            self.translate,
            self.translate,
            self.shear,
            self.brightness,
            self.contrast,
            self.zoom,
        ]
    }

    /// Searched genes: all seven with `filters`, else rotation, translations and shear.
    pub fn active_genes(&self) -> usize {
        if self.filters {
            NUM_GENES
        } else {
            4
        }
    }

    /// Whether `t` lies in the configured ranges and grids (inactive genes at identity).
    pub fn contains(&self, t: &Transform) -> bool {
        let ranges = self.ranges();
        let active = self.active_genes();
        t.genes().iter().enumerate().all(|(i, &v)| {
            if i < active {
                ranges[i].contains(v)
            } else {
                (v - ranges[i].centre).abs() < 1e-12
            }
        })
    }

    /// A uniformly random transform on the grid (the reference's `random_init`).
    pub fn random_transform(&self, rng: &mut impl Rng) -> Transform {
        let ranges = self.ranges();
        let active = self.active_genes();
        Transform::from_genes(std::array::from_fn(|i| {
            if i < active {
                ranges[i].random(rng)
            } else {
                ranges[i].centre
            }
        }))
    }
}

/// A transform with the loss of its variant at its last evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Individual {
    pub transform: Transform,
    pub loss: f32,
}

/// One image's GA state, kept by the trainer across epochs (one per training image).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Population {
    /// Sorted by loss, highest first, once evaluated.
    pub members: Vec<Individual>,
    /// Whether `members` carry measured losses (false before the first visit).
    pub evaluated: bool,
}

/// What one image's generation asks to evaluate.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub candidates: Vec<Transform>,
    /// Point-wise robust (SENSEI-SA): only the current worst variant is evaluated.
    pub robust: bool,
}

/// Every image's population as bytes, exactly (checkpoints carry them so that a resumed run
/// continues the same search): per population a flag byte and a member count (u32 LE), per
/// member the 7 genes (f64 LE) and the loss (f32 LE). A format this small needs no crate.
pub fn encode_populations(populations: &[Population]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + populations.len() * 5);
    out.extend_from_slice(&(populations.len() as u64).to_le_bytes());
    for p in populations {
        out.push(u8::from(p.evaluated));
        out.extend_from_slice(&(p.members.len() as u32).to_le_bytes());
        for m in &p.members {
            for gene in m.transform.genes() {
                out.extend_from_slice(&gene.to_le_bytes());
            }
            out.extend_from_slice(&m.loss.to_le_bytes());
        }
    }
    out
}

/// The inverse of [`encode_populations`]; refuses truncated or trailing bytes.
pub fn decode_populations(bytes: &[u8]) -> anyhow::Result<Vec<Population>> {
    let mut rest = bytes;
    let mut take = |n: usize| -> anyhow::Result<&[u8]> {
        anyhow::ensure!(rest.len() >= n, "SENSEI populations: truncated");
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let count = u64::from_le_bytes(take(8)?.try_into()?) as usize;
    let mut populations = Vec::with_capacity(count.min(bytes.len()));
    for _ in 0..count {
        let evaluated = match take(1)?[0] {
            0 => false,
            1 => true,
            other => anyhow::bail!("SENSEI populations: flag byte {other}"),
        };
        let members = u32::from_le_bytes(take(4)?.try_into()?) as usize;
        let mut p = Population {
            members: Vec::with_capacity(members.min(bytes.len())),
            evaluated,
        };
        for _ in 0..members {
            let mut genes = [0f64; NUM_GENES];
            for g in &mut genes {
                *g = f64::from_le_bytes(take(8)?.try_into()?);
            }
            p.members.push(Individual {
                transform: Transform::from_genes(genes),
                loss: f32::from_le_bytes(take(4)?.try_into()?),
            });
        }
        populations.push(p);
    }
    anyhow::ensure!(
        rest.is_empty(),
        "SENSEI populations: {} trailing bytes",
        rest.len()
    );
    Ok(populations)
}

impl Population {
    /// The initial population: the identity plus `initial_population − 1` random transforms,
    /// losses initialized to 1 as in the reference.
    pub fn new(cfg: &SenseiConfig, rng: &mut impl Rng) -> Self {
        let mut members = vec![Individual {
            transform: Transform::IDENTITY,
            loss: 1.0,
        }];
        for _ in 1..cfg.initial_population.max(1) {
            members.push(Individual {
                transform: cfg.random_transform(rng),
                loss: 1.0,
            });
        }
        Population {
            members,
            evaluated: false,
        }
    }

    /// The current worst (highest-loss) transform.
    pub fn top(&self) -> Option<&Individual> {
        self.members.first()
    }

    /// SENSEI-SA's predicate: selective augmentation on, the population evaluated, and the
    /// worst variant's loss below the robustness threshold.
    pub fn is_point_wise_robust(&self, cfg: &SenseiConfig) -> bool {
        cfg.selective
            && self.evaluated
            && self
                .top()
                .is_some_and(|top| top.loss < cfg.robust_threshold)
    }

    /// The candidates of this epoch's generation (see the module doc).
    pub fn propose(&mut self, cfg: &SenseiConfig, rng: &mut impl Rng) -> Proposal {
        if self.members.is_empty() {
            *self = Population::new(cfg, rng);
        }
        let all = |p: &Population| p.members.iter().map(|m| m.transform).collect::<Vec<_>>();
        if !self.evaluated {
            return Proposal {
                candidates: all(self),
                robust: false,
            };
        }
        if self.is_point_wise_robust(cfg) {
            return Proposal {
                candidates: vec![self.members[0].transform],
                robust: true,
            };
        }
        let mut existing = all(self);
        let top = self.members[0];
        let coarse = top.loss < cfg.coarse_step_below_loss;
        let children = if self.members.len() < 2 || rng.random::<f64>() < cfg.mutation_prob {
            mutate(&top.transform, &mut existing, coarse, cfg, rng)
        } else {
            let partner = self.crossover_partner();
            crossover(&top.transform, &partner, &mut existing, coarse, cfg, rng)
        };
        let mut candidates = all(self);
        candidates.extend(children);
        Proposal {
            candidates,
            robust: false,
        }
    }

    /// The kept transform (other than the top) differing from the top in the most genes; the
    /// first such on ties, the second member when none differs (reference `select_item`).
    fn crossover_partner(&self) -> Transform {
        let top = self.members[0].transform;
        let mut best = self.members[1].transform;
        let mut maximal = 0;
        for m in &self.members[1..] {
            let d = top.differing_genes(&m.transform);
            if d > maximal {
                maximal = d;
                best = m.transform;
            }
        }
        best
    }

    /// Records the losses of a [`Proposal`]'s candidates: sorts by loss (highest first) and
    /// keeps `survivors`; for a robust proposal only the top's loss is refreshed. Returns the
    /// index in `proposal.candidates` of the highest-loss candidate (the training variant).
    pub fn update(&mut self, proposal: &Proposal, losses: &[f32], cfg: &SenseiConfig) -> usize {
        assert_eq!(
            proposal.candidates.len(),
            losses.len(),
            "one loss per candidate"
        );
        assert!(!losses.is_empty(), "at least one candidate");
        let worst = argmax(losses);
        if proposal.robust {
            self.members[0].loss = losses[0];
        } else {
            self.members = proposal
                .candidates
                .iter()
                .zip(losses)
                .map(|(&transform, &loss)| Individual { transform, loss })
                .collect();
        }
        // Stable: ties keep the earlier (older) transform first, as Python's sort does.
        self.members.sort_by(|a, b| {
            b.loss
                .partial_cmp(&a.loss)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        if !proposal.robust {
            self.members.truncate(cfg.survivors.max(1));
        }
        self.evaluated = true;
        worst
    }
}

/// The first index of the largest value (NaN counts as smallest).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() && !x.is_nan() {
            best = i;
        }
    }
    best
}

/// One mutated transform (`generate_mutated_node`): `genes_mutated` distinct active genes each
/// go up a step, down a step, or reflect about the identity, uniformly; snapped and clamped.
fn mutated(t: &Transform, coarse: bool, cfg: &SenseiConfig, rng: &mut impl Rng) -> Transform {
    let ranges = cfg.ranges();
    let active = cfg.active_genes();
    let mut g = t.genes();
    let k = cfg.genes_mutated.clamp(1, active);
    for i in sample(rng, active, k).iter() {
        let r = ranges[i];
        // Rotation (0) and shear (3) take doubled steps when the top loss is tiny.
        let step = if coarse && (i == 0 || i == 3) {
            2.0 * r.step
        } else {
            r.step
        };
        g[i] = match rng.random_range(0..3) {
            0 => r.fit(g[i] + step),
            1 => r.fit(g[i] - step),
            _ => r.fit(2.0 * r.centre - g[i]),
        };
    }
    Transform::from_genes(g)
}

/// `mutate_node`: up to 10 tries for a mutant not already in `existing`, else `t` itself.
fn mutate_node(
    t: &Transform,
    existing: &[Transform],
    coarse: bool,
    cfg: &SenseiConfig,
    rng: &mut impl Rng,
) -> Transform {
    for _ in 0..10 {
        let m = mutated(t, coarse, cfg, rng);
        if !existing.iter().any(|e| e.same_as(&m)) {
            return m;
        }
    }
    *t
}

/// `children` mutants of `top`, each distinct from `existing` where 10 tries allow.
fn mutate(
    top: &Transform,
    existing: &mut Vec<Transform>,
    coarse: bool,
    cfg: &SenseiConfig,
    rng: &mut impl Rng,
) -> Vec<Transform> {
    (0..cfg.children)
        .map(|_| {
            let c = mutate_node(top, existing, coarse, cfg, rng);
            existing.push(c);
            c
        })
        .collect()
}

/// `children` crossovers of `top` with `partner`: each child takes the partner's genes where a
/// distinct random mask (a non-empty proper subset of the active genes) has a bit; a child
/// already present is mutated instead. More children than masks get the empty mask (a copy of
/// the top, then mutated), as the reference pads with mask 0.
fn crossover(
    top: &Transform,
    partner: &Transform,
    existing: &mut Vec<Transform>,
    coarse: bool,
    cfg: &SenseiConfig,
    rng: &mut impl Rng,
) -> Vec<Transform> {
    let active = cfg.active_genes();
    let masks_available = (1usize << active) - 2;
    let n_sampled = cfg.children.min(masks_available);
    let mut masks: Vec<usize> = sample(rng, masks_available, n_sampled)
        .iter()
        .map(|m| m + 1)
        .collect();
    masks.resize(cfg.children, 0);
    let (a, b) = (top.genes(), partner.genes());
    masks
        .into_iter()
        .map(|mask| {
            let child = Transform::from_genes(std::array::from_fn(|i| {
                if i < active && mask & (1 << i) != 0 {
                    b[i]
                } else {
                    a[i]
                }
            }));
            let child = if existing.iter().any(|e| e.same_as(&child)) {
                mutate_node(&child, existing, coarse, cfg, rng)
            } else {
                child
            };
            existing.push(child);
            child
        })
        .collect()
}

/// Applies a transform to an HWC RGB u8 image, size kept: rotate, translate and shear through
/// [`augmix_ops::apply`](crate::augmix_ops::apply) (PIL's affine, bilinear, black fill; integer
/// translations are exact copies), zoom about the centre the same way, then brightness and
/// contrast as the reference's `image_brightness`/`image_contrast`. Identity genes are skipped,
/// so [`Transform::IDENTITY`] returns the image unchanged.
pub fn apply_transform(img: &ImageRef, t: &Transform) -> Vec<u8> {
    let mut out = img.pixels.to_vec();
    let step = |out: &mut Vec<u8>, op: Op| {
        let next = apply(
            op,
            &ImageRef {
                pixels: out.as_slice(),
                ..*img
            },
        );
        *out = next;
    };
    if t.rotate_deg != 0.0 {
        step(&mut out, Op::Rotate(t.rotate_deg));
    }
    if t.translate_x != 0.0 {
        step(&mut out, Op::TranslateX(t.translate_x));
    }
    if t.translate_y != 0.0 {
        step(&mut out, Op::TranslateY(t.translate_y));
    }
    if t.shear != 0.0 {
        step(&mut out, Op::ShearX(t.shear));
    }
    if t.zoom != 1.0 && t.zoom > 0.0 {
        // Output point p samples the source at c + (p − c)/zoom.
        let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
        let s = 1.0 / t.zoom;
        out = affine_bilinear(
            &ImageRef {
                pixels: &out,
                ..*img
            },
            [s, 0.0, cx * (1.0 - s), 0.0, s, cy * (1.0 - s)],
        );
    }
    if t.brightness != 0.0 {
        let b = t.brightness.round() as i32;
        for v in out.iter_mut() {
            *v = (*v as i32 + b).clamp(0, 255) as u8;
        }
    }
    if t.contrast != 1.0 {
        for v in out.iter_mut() {
            *v = ((*v as f64 - 127.0) * t.contrast + 127.0).clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// The model link of [`sensei_select`]: `(owners, candidates) → losses`, one loss per
/// candidate image, `owners[k]` the batch index of the image candidate `k` was made from.
pub type Fitness<'a> = dyn FnMut(&[usize], &[Vec<u8>]) -> Vec<f32> + 'a;

/// What [`sensei_select`] chose for a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct SenseiSelection {
    /// Per image: the highest-loss variant (the training image for this epoch).
    pub images: Vec<Vec<u8>>,
    /// Per image: its loss.
    pub losses: Vec<f32>,
    /// Per image: the transform that made it.
    pub transforms: Vec<Transform>,
    /// Per image: skipped as point-wise robust (SENSEI-SA), its current worst variant reused.
    pub robust: Vec<bool>,
    /// Candidates evaluated in this call.
    pub evaluated: usize,
}

/// One SENSEI generation for a batch: each image's [`Population`] proposes candidates, all
/// candidate images of the batch go to `fitness` in one call, and each image gets its
/// highest-loss variant; the populations are updated for the next epoch.
///
/// `fitness(owners, candidates)` returns one loss per candidate (the caller's model's
/// cross-entropy against the label of `imgs[owners[k]]`; the reference clips probabilities to
/// [1e-8, 1 − 1e-8]); it may split the candidates into model batches itself. It is the only
/// link to a model. `populations[i]` belongs to `imgs[i]` and lives across epochs; pass
/// `Population::default()` for a fresh one.
pub fn sensei_select(
    imgs: &[ImageRef],
    populations: &mut [Population],
    fitness: &mut Fitness<'_>,
    cfg: &SenseiConfig,
    rng: &mut impl Rng,
) -> SenseiSelection {
    assert_eq!(imgs.len(), populations.len(), "one population per image");
    let proposals: Vec<Proposal> = populations
        .iter_mut()
        .map(|p| p.propose(cfg, rng))
        .collect();
    let mut owners = Vec::new();
    let mut candidates = Vec::new();
    for (i, (img, prop)) in imgs.iter().zip(&proposals).enumerate() {
        for t in &prop.candidates {
            owners.push(i);
            candidates.push(apply_transform(img, t));
        }
    }
    let losses = fitness(&owners, &candidates);
    assert_eq!(
        losses.len(),
        candidates.len(),
        "fitness: one loss per candidate"
    );
    let n = imgs.len();
    let mut out = SenseiSelection {
        images: Vec::with_capacity(n),
        losses: Vec::with_capacity(n),
        transforms: Vec::with_capacity(n),
        robust: Vec::with_capacity(n),
        evaluated: candidates.len(),
    };
    let mut candidates = candidates.into_iter().map(Some).collect::<Vec<_>>();
    let mut offset = 0;
    for (pop, prop) in populations.iter_mut().zip(&proposals) {
        let k = prop.candidates.len();
        let own = &losses[offset..offset + k];
        let worst = pop.update(prop, own, cfg);
        out.images
            .push(candidates[offset + worst].take().expect("taken once"));
        out.losses.push(own[worst]);
        out.transforms.push(prop.candidates[worst]);
        out.robust.push(prop.robust);
        offset += k;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn populations_round_trip_exactly_and_bad_bytes_are_refused() {
        let cfg = SenseiConfig::default();
        let mut rng = StdRng::seed_from_u64(5);
        let mut evaluated = Population::new(&cfg, &mut rng);
        evaluated.evaluated = true;
        evaluated.members[1].loss = 0.1 + 0.2; // not representable in short decimal
        let pops = vec![
            Population::default(),
            evaluated,
            Population::new(&cfg, &mut rng),
        ];
        let bytes = encode_populations(&pops);
        assert_eq!(decode_populations(&bytes).unwrap(), pops);
        assert!(decode_populations(&bytes[..bytes.len() - 1]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_populations(&trailing).is_err());
        assert_eq!(
            decode_populations(&encode_populations(&[])).unwrap(),
            Vec::<Population>::new()
        );
    }

    fn gradient(w: usize, h: usize) -> Vec<u8> {
        (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [(x * 7) as u8, (y * 5) as u8, 90]))
            .collect()
    }

    #[test]
    fn identity_returns_the_image() {
        let px = gradient(32, 32);
        let img = ImageRef {
            pixels: &px,
            width: 32,
            height: 32,
        };
        assert_eq!(apply_transform(&img, &Transform::IDENTITY), px);
    }

    #[test]
    fn pixel_transforms_follow_the_reference_formulas() {
        let px = gradient(16, 16);
        let img = ImageRef {
            pixels: &px,
            width: 16,
            height: 16,
        };
        let bright = apply_transform(
            &img,
            &Transform {
                brightness: 32.0,
                ..Transform::IDENTITY
            },
        );
        for (a, &b) in bright.iter().zip(&px) {
            assert_eq!(*a, (b as i32 + 32).min(255) as u8);
        }
        let contrast = apply_transform(
            &img,
            &Transform {
                contrast: 0.8,
                ..Transform::IDENTITY
            },
        );
        for (a, &b) in contrast.iter().zip(&px) {
            assert_eq!(*a, ((b as f64 - 127.0) * 0.8 + 127.0) as u8);
        }
        // An integer translation moves pixels exactly (PIL: output x samples input x + t).
        let shifted = apply_transform(
            &img,
            &Transform {
                translate_x: 2.0,
                ..Transform::IDENTITY
            },
        );
        for y in 0..16 {
            for x in 0..14 {
                let (o, i) = ((y * 16 + x) * 3, (y * 16 + x + 2) * 3);
                assert_eq!(shifted[o..o + 3], px[i..i + 3]);
            }
            assert_eq!(shifted[(y * 16 + 15) * 3..(y * 16 + 16) * 3], [0, 0, 0]);
        }
        // Zooming out leaves a black border; zooming in keeps the centre pixel's value.
        let out = apply_transform(
            &img,
            &Transform {
                zoom: 0.9,
                ..Transform::IDENTITY
            },
        );
        assert_eq!(out[0..3], [0, 0, 0]);
        assert_eq!(out.len(), px.len());
    }

    #[test]
    fn default_config_matches_the_reference() {
        let cfg = SenseiConfig::default();
        assert_eq!(
            (cfg.survivors, cfg.children, cfg.initial_population),
            (4, 6, 10)
        );
        assert_eq!(cfg.survivors + cfg.children, 10);
        assert_eq!(cfg.mutation_prob, 0.6);
        assert_eq!(cfg.robust_threshold, 1e-3);
        assert!(!cfg.selective && SenseiConfig::selective().selective);
        assert!(cfg.contains(&Transform::IDENTITY));
    }

    #[test]
    fn transforms_stay_within_the_configured_ranges() {
        for filters in [true, false] {
            let cfg = SenseiConfig {
                filters,
                ..SenseiConfig::default()
            };
            let mut rng = StdRng::seed_from_u64(5);
            let mut pop = Population::new(&cfg, &mut rng);
            assert_eq!(pop.members.len(), 10);
            assert_eq!(pop.members[0].transform, Transform::IDENTITY);
            let mut seen_extremes = [false; 2];
            for _ in 0..300 {
                let prop = pop.propose(&cfg, &mut rng);
                for t in &prop.candidates {
                    assert!(cfg.contains(t), "{t:?}");
                    seen_extremes[0] |= t.rotate_deg == -30.0;
                    seen_extremes[1] |= t.rotate_deg == 30.0;
                }
                let losses: Vec<f32> = (0..prop.candidates.len())
                    .map(|_| rng.random::<f32>())
                    .collect();
                pop.update(&prop, &losses, &cfg);
                assert!(pop.members.len() <= cfg.survivors);
            }
            assert!(seen_extremes[0] && seen_extremes[1]);
        }
    }

    #[test]
    fn ga_converges_to_the_fitness_maximum() {
        // Synthetic fitness: loss = rotation angle + 30 (max at +30°), with a small pull
        // towards positive brightness.
        let cfg = SenseiConfig::default();
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut pop = Population::new(&cfg, &mut rng);
            let mut best = Vec::new();
            for _ in 0..30 {
                let prop = pop.propose(&cfg, &mut rng);
                let losses: Vec<f32> = prop
                    .candidates
                    .iter()
                    .map(|t| (t.rotate_deg + 30.0) as f32 + t.brightness as f32 / 1000.0)
                    .collect();
                pop.update(&prop, &losses, &cfg);
                best.push(pop.members[0].loss);
            }
            assert!(best.windows(2).all(|w| w[1] >= w[0]), "monotone: {best:?}");
            let top = pop.members[0].transform;
            assert_eq!(top.rotate_deg, 30.0, "seed {seed}: {top:?}");
            assert_eq!(top.brightness, 32.0, "seed {seed}: {top:?}");
        }
    }

    #[test]
    fn sensei_select_picks_the_worst_variant_in_one_fitness_call() {
        // Uniform grey images; loss = mean pixel value / 255 (brighter is "worse").
        let cfg = SenseiConfig::default();
        let px: Vec<Vec<u8>> = (0..3)
            .map(|i| vec![80 + 20 * i as u8; 16 * 16 * 3])
            .collect();
        let imgs: Vec<ImageRef> = px
            .iter()
            .map(|p| ImageRef {
                pixels: p,
                width: 16,
                height: 16,
            })
            .collect();
        let mut pops = vec![Population::default(); 3];
        let mut rng = StdRng::seed_from_u64(11);
        let mut calls = 0;
        let mut fitness = |owners: &[usize], cands: &[Vec<u8>]| {
            calls += 1;
            assert_eq!(owners.len(), cands.len());
            cands
                .iter()
                .map(|c| c.iter().map(|&v| v as f32).sum::<f32>() / (c.len() as f32 * 255.0))
                .collect()
        };
        let mut last = None;
        for epoch in 0..40 {
            let sel = sensei_select(&imgs, &mut pops, &mut fitness, &cfg, &mut rng);
            assert_eq!(sel.evaluated, 3 * 10, "epoch {epoch}");
            for (i, img) in imgs.iter().enumerate() {
                assert_eq!(apply_transform(img, &sel.transforms[i]), sel.images[i]);
                assert!(!sel.robust[i]);
            }
            last = Some(sel);
        }
        assert_eq!(calls, 40);
        let sel = last.unwrap();
        for (i, t) in sel.transforms.iter().enumerate() {
            assert_eq!(t.brightness, 32.0, "{t:?}");
            assert_eq!(sel.images[i], apply_transform(&imgs[i], t));
            // Near the best reachable mean: brightness +32, the better contrast end, and
            // (almost) no black fill from the geometric genes.
            let g = px[i][0] as f64 + 32.0;
            let best = [0.8, 1.2].map(|c| (g - 127.0) * c + 127.0);
            let best = best[0].max(best[1]) / 255.0;
            assert!(
                sel.losses[i] as f64 > 0.98 * best,
                "{t:?}: {}",
                sel.losses[i]
            );
        }
    }

    #[test]
    fn selective_augmentation_skips_robust_images() {
        let cfg = SenseiConfig::selective();
        let px = gradient(8, 8);
        let imgs = vec![
            ImageRef {
                pixels: &px,
                width: 8,
                height: 8,
            };
            2
        ];
        let mut pops = vec![Population::default(); 2];
        let mut rng = StdRng::seed_from_u64(2);
        // Image 0 is robust (tiny loss everywhere), image 1 is not.
        let mut tiny_for_0 = |owners: &[usize], _: &[Vec<u8>]| {
            owners
                .iter()
                .map(|&o| if o == 0 { 1e-5 } else { 0.5 })
                .collect::<Vec<f32>>()
        };
        let first = sensei_select(&imgs, &mut pops, &mut tiny_for_0, &cfg, &mut rng);
        assert_eq!(first.evaluated, 20);
        assert_eq!(first.robust, vec![false, false]);
        assert!(pops[0].is_point_wise_robust(&cfg) && !pops[1].is_point_wise_robust(&cfg));
        let second = sensei_select(&imgs, &mut pops, &mut tiny_for_0, &cfg, &mut rng);
        assert_eq!(second.robust, vec![true, false]);
        assert_eq!(second.evaluated, 1 + 10);
        assert_eq!(second.transforms[0], pops[0].members[0].transform);
        // Once its loss rises, image 0 is searched again.
        let mut big = |owners: &[usize], _: &[Vec<u8>]| vec![0.5f32; owners.len()];
        let third = sensei_select(&imgs, &mut pops, &mut big, &cfg, &mut rng);
        assert_eq!(third.robust, vec![true, false]);
        let fourth = sensei_select(&imgs, &mut pops, &mut big, &cfg, &mut rng);
        assert_eq!(fourth.robust, vec![false, false]);
        assert_eq!(fourth.evaluated, 20);
        // Plain SENSEI never skips.
        let plain = SenseiConfig::default();
        let mut pops = vec![Population::default(); 2];
        sensei_select(&imgs, &mut pops, &mut tiny_for_0, &plain, &mut rng);
        let s = sensei_select(&imgs, &mut pops, &mut tiny_for_0, &plain, &mut rng);
        assert_eq!(s.robust, vec![false, false]);
        assert_eq!(s.evaluated, 20);
    }

    #[test]
    fn seeded_rng_is_deterministic() {
        let cfg = SenseiConfig::default();
        let px = gradient(8, 8);
        let imgs = [ImageRef {
            pixels: &px,
            width: 8,
            height: 8,
        }];
        let run = || {
            let mut pops = vec![Population::default()];
            let mut rng = StdRng::seed_from_u64(77);
            let mut f = |_: &[usize], c: &[Vec<u8>]| {
                c.iter()
                    .map(|v| v.iter().map(|&x| x as f32).sum::<f32>())
                    .collect::<Vec<f32>>()
            };
            (0..5)
                .map(|_| sensei_select(&imgs, &mut pops, &mut f, &cfg, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}

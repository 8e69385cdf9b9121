"""Every Prometheus metric of the workers, in one place (prefix ``diffuserve_``).

Under ``diffuserve serve`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start, so
these values land in shared files and one scrape of the API's ``/metrics`` includes every worker's. A
standalone ``diffuserve worker --metrics-port N`` serves its own.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)

STEP_SECONDS = Histogram("diffuserve_denoise_step_seconds", "One UNet call + sampler updates",
                         ["resolution", "batch"], buckets=STEP_BUCKETS)
DECODE_SECONDS = Histogram("diffuserve_vae_decode_seconds", "VAE decode of the samples finished in one tick",
                           buckets=STEP_BUCKETS)
QUEUE_WAIT = Histogram("diffuserve_queue_wait_seconds", "Enqueue to admission into a batch", buckets=LATENCY_BUCKETS)
FIRST_STEP = Histogram("diffuserve_time_to_first_step_seconds", "Enqueue to the job's first denoising step",
                       buckets=LATENCY_BUCKETS)
INFERENCE = Histogram("diffuserve_inference_seconds", "Admission to result written", buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("diffuserve_batch_size", "Samples per UNet call", buckets=(1, 2, 4, 8, 16, 32, 64))
IMAGES = Counter("diffuserve_images_generated_total", "Images generated", ["model"])
JOBS = Counter("diffuserve_jobs_total", "Jobs by final status", ["model", "status"])
RECLAIMS = Counter("diffuserve_reclaims_total", "Jobs claimed from dead workers", ["model"])
POISON = Counter("diffuserve_poison_jobs_total", "Jobs failed as poison after too many deliveries", ["model"])
RUNNING = Gauge("diffuserve_running_samples", "Samples in the running batch", ["worker"], multiprocess_mode="livesum")
GRAPHS_PENDING = Gauge("diffuserve_fast_graphs_pending", "Fast mode: compiled graphs not yet in use (calls that need "
                       "them run eager)", ["worker"], multiprocess_mode="livesum")
ADAPTER = Counter("diffuserve_adapter_cache_events_total", "LoRA adapter cache events", ["event"])
ADAPTER_LOAD_SECONDS = Counter("diffuserve_adapter_load_seconds_total", "Time spent loading adapters")
DEVICE_MEMORY = Gauge("diffuserve_device_memory_bytes", "Accelerator memory in use", ["worker"],
                      multiprocess_mode="livemax")

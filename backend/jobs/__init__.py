"""The work the queues run (RQ workers, or the embedded worker thread), as plain functions, queued
by import path:

* webhook.apply_webhook     annotation/project/task events, checked against Label Studio -> one
                            atomic bank update -> refresh and evaluation queued
* bank.rebuild_bank         a fresh bank from every annotated task, read through the LS API
* train.train_project       START_TRAINING: rebuild, then pre-annotate every unlabelled task
* predict.predict_task      the unit of /predict work, with late delivery through the LS API
* interactive.segment_task  a click/box -> one mask region; interactive.warm_task: the SAM2
                            embedding of an opened task's image, computed ahead of the first click
* refresh.refresh_project   after a bank change: every processed task re-scored from its cached
                            proposals and brought to the new model_version
* evaluation.evaluate_project  leave-one-task-out scores, calibrated thresholds, variant in use

Each job builds one JobContext (context.py) and hands it to its helpers. Jobs may run twice
(retries, spool replays): each one is idempotent (backend.delivery posts without duplicates).
Every job returns a small JSON-able dict. Jobs that work through many tasks (rebuild, train,
refresh) call `queueing.serve_interactive()` before each task, so a click waits for one task's
work at most.
"""

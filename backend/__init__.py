"""Label Studio side of the ML backend.

The adapter layer (label_config, results, annotations, images, ls_client, errors) translates between
Label Studio's wire formats and the method's plain types (model.types.Detections, masks, boxes);
the Flask app and the RQ jobs are built on top of it.
"""

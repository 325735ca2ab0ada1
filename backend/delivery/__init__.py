"""Getting predictions into Label Studio: per-task posts and bulk refreshes."""

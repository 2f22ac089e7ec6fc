"""The method: the hybrid objective and its losses, impact scores (Stage 2), the LightningModule and the
DataModule that serves triaged splits, the ablation group, choosing when to stop (select), distributed
strategies, resumable checkpoints and schedules."""

"""Adapters that put ``ffsd_kernels``' losses where other toolkits look for losses; each is imported on its own
(``import ffsd_kernels.integrations.torchdistill``), so ``ffsd_kernels`` itself never needs the toolkit."""

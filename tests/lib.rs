mod gpu_grouped;

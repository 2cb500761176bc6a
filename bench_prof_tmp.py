import cProfile, pstats, time, numpy as np, sys
sys.path.insert(0,'.')
from inference.engine import Engine
from bench.gpu_check import sample_images
e = Engine(intra_op_threads=2, batch_size=64, cpu_memory_arena=False)
imgs = sample_images(64)
print(imgs[0].shape, imgs[0].dtype)
e.predict(imgs[:8], cam=False)
pr = cProfile.Profile(); pr.enable()
t=time.perf_counter(); e.predict(imgs, cam=False); dt=time.perf_counter()-t
pr.disable()
print("total", dt)
st = pstats.Stats(pr); st.sort_stats('tottime').print_stats(15)

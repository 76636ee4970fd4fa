#!/usr/bin/env python3
"""The real AUTOMATIC1111 client against `sdfix serve`, unchanged (issue 20). Run by hand:

    cargo build --release
    python3 -m venv .venv-client && .venv-client/bin/pip install webuiapi
    .venv-client/bin/python scripts/webuiapi_check.py [--binary target/release/sdfix]

Starts `sdfix serve --model demo` on a free loopback port (and a second one with --api-auth),
then uses webuiapi's own calls: get_samplers, get_sd_models, txt2img (also with the hires fix),
util_set_model, util_wait_for_ready, get_options, img2img (with and without mask_image),
get_progress (its current_image while a picture is drawn). Prints one line per check and what it
measured; exits 1 on the first failure. Results are recorded in docs/serve.md.
"""

import argparse
import base64
import io
import subprocess
import sys
import threading
import time
from importlib.metadata import version

import webuiapi
from PIL import Image


def luminance(image):
    """Mean Rec. 709 luminance of sRGB values in 0..1 (as `sdfix stats`)."""
    data = image.convert("RGB").tobytes()
    pixels = len(data) // 3
    total = sum(0.2126 * data[i] + 0.7152 * data[i + 1] + 0.0722 * data[i + 2] for i in range(0, len(data), 3))
    return total / (255.0 * pixels)


class Server:
    """`sdfix serve` on port 0; the bound port read from its first line."""

    def __init__(self, binary, *extra):
        self.process = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0"] + list(extra),
            stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        self.port = int(line.split("http://")[1].split()[0].rsplit(":", 1)[1])

    def stop(self):
        self.process.terminate()
        self.process.wait()


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/sdfix")
    args = parser.parse_args()
    print(f"webuiapi {version('webuiapi')}")

    server = Server(args.binary, "--model", "demo")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        samplers = [s["name"] for s in api.get_samplers()]
        check("get_samplers", {"DDIM", "Euler a", "DPM++ 2M"} <= set(samplers), ", ".join(samplers))
        models = [m["title"] for m in api.get_sd_models()]
        check("get_sd_models", models == ["demo", "demo-flawed"], ", ".join(models))

        # webuiapi's defaults otherwise (Euler a, scheduler automatic, cfg 7, eta 1, seed -1,
        # ~45 fields); 32x32 is the demo model's size (the default 512x512 works but is slow).
        started = time.time()
        result = api.txt2img(prompt="solid black background", width=32, height=32, seed=1)
        seconds = time.time() - started
        lum = luminance(result.image)
        check("txt2img solid black background", lum <= 0.08,
              f"luminance {lum:.4f}, {result.image.size}, {seconds:.2f} s, sampler {result.info['sampler_name']}")
        check("txt2img info", result.info["all_seeds"] == [1] and result.info["zero_snr"] is True
              and result.info["spacing"] == "trailing", f"seed {result.info['seed']}, zero_snr, trailing")
        parameters = result.image.info.get("parameters", "")
        check("PNG parameters chunk (PIL)", parameters == result.info["infotexts"][0], parameters.splitlines()[-1])

        # The hires fix as webuiapi sends it (its own hr_* defaults included): 32x32 upscaled 1.5x.
        for upscaler in (webuiapi.HiResUpscaler.LatentBicubic, webuiapi.HiResUpscaler.Lanczos):
            hires = api.txt2img(prompt="solid black background", width=32, height=32, seed=4, steps=10,
                                enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler,
                                hr_second_pass_steps=5, denoising_strength=0.6)
            infotext = hires.info["infotexts"][0]
            expected = ["Size: 32x32", "Hires upscale: 1.5", f"Hires upscaler: {upscaler.value}",
                        "Hires steps: 5", "Denoising strength: 0.6"]
            check(f"txt2img hires fix ({upscaler.value})", hires.image.size == (48, 48)
                  and all(item in infotext for item in expected) and luminance(hires.image) <= 0.08,
                  f"{hires.image.size}, luminance {luminance(hires.image):.4f}, {infotext.splitlines()[-1]}")

        # A1111's second-pass overrides through webuiapi's own keywords: another sampler and prompts.
        hires = api.txt2img(prompt="solid black background", width=32, height=32, seed=4, steps=10,
                            sampler_name="Euler a", enable_hr=True, hr_scale=1.5, hr_second_pass_steps=5,
                            denoising_strength=0.6, hr_sampler_name="DDIM",
                            hr_prompt="solid white background, bright", hr_negative_prompt="dark")
        infotext = hires.info["infotexts"][0]
        expected = ["Sampler: Euler a", "Hires sampler: DDIM", 'Hires prompt: "solid white background, bright"',
                    "Hires negative prompt: dark"]
        check("txt2img hires fix with hr_sampler_name, hr_prompt, hr_negative_prompt",
              hires.image.size == (48, 48) and all(item in infotext for item in expected)
              and luminance(hires.image) >= 0.3,
              f"luminance {luminance(hires.image):.4f} (the same request without them: about 0.001), {infotext.splitlines()[-1]}")

        # get_progress while a long run draws: current_image is a PNG (A1111's live preview).
        previews = []
        run = threading.Thread(target=lambda: api.txt2img(prompt="solid black background", width=32,
                                                          height=32, seed=5, steps=150))
        run.start()
        while run.is_alive():
            progress = api.get_progress()
            if progress.get("current_image"):
                previews.append(Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))))
            time.sleep(0.05)
        run.join()
        check("get_progress current_image while drawing", len(previews) > 0
              and all(p.format == "PNG" for p in previews),
              f"{len(previews)} previews, {previews[0].size if previews else None}")

        api.util_set_model("demo-flawed")
        api.util_wait_for_ready(check_interval=0.2)
        current = api.get_options()["sd_model_checkpoint"]
        check("util_set_model demo-flawed + util_wait_for_ready", current == "demo-flawed", current)
        # webuiapi's txt2img takes no extra keywords: sdfix's own fields (spacing,
        # guidance_rescale, zero_snr) need a raw request; override_settings passes through.
        flawed = api.txt2img(prompt="solid black background", width=32, height=32, seed=1,
                             sampler_name="DDIM", override_settings={"sd_noise_schedule": "Default"})
        check("txt2img on demo-flawed", flawed.info["sd_model_name"] == "demo-flawed"
              and flawed.info["zero_snr"] is False,
              f"luminance {luminance(flawed.image):.4f} (the model trained the stock way)")
        api.util_set_model("demo")
        api.util_wait_for_ready(check_interval=0.2)
        check("util_set_model demo", api.get_options()["sd_model_checkpoint"] == "demo")

        # img2img and inpainting as webuiapi sends them (its defaults: mask_blur 4, resize_mode 0,
        # inpainting_fill 0, ...): a grey picture at strength 1 comes back black; with a mask,
        # the kept half stays grey.
        grey = Image.new("RGB", (32, 32), (128, 128, 128))
        black = api.img2img(images=[grey], prompt="solid black background", seed=3, steps=10,
                            denoising_strength=1.0, width=32, height=32)
        check("img2img solid black background from grey", luminance(black.image) <= 0.08
              and black.info["denoising_strength"] == 1.0, f"luminance {luminance(black.image):.4f}")
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (16, 0, 32, 32))
        painted = api.img2img(images=[grey], mask_image=mask, prompt="solid black background", seed=3,
                              steps=10, denoising_strength=1.0, width=32, height=32, mask_blur=2)
        left = painted.image.crop((0, 0, 10, 32))
        right = painted.image.crop((22, 0, 32, 32))
        check("img2img inpainting (mask_image)", left.getextrema() == ((128, 128),) * 3
              and luminance(right) < 0.2, f"kept half {left.getextrema()[0]}, repainted {luminance(right):.4f}")
    finally:
        server.stop()

    server = Server(args.binary, "--model", "demo", "--api-auth", "user:secret")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="user", password="secret")
        result = api.txt2img(prompt="solid black background", width=32, height=32, seed=2, steps=10)
        check("txt2img with --api-auth (set_auth)", luminance(result.image) <= 0.08)
        anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        try:
            anonymous.txt2img(prompt="x", width=32, height=32)
            check("without credentials: refused", False)
        except RuntimeError as err:
            check("without credentials: refused", err.args[0] == 401, str(err.args[0]))
    finally:
        server.stop()


if __name__ == "__main__":
    main()

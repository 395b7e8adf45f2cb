"""Write a short synthetic video (a red square crossing a gradient) to try Vamba on: H.264 in MP4, which every
browser plays (the Space previews it). Needs PyAV (`pip install av`).

    python examples/make_sample_video.py sample.mp4
"""

import argparse

from vamba_hf.demo import write_demo_video


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default="sample.mp4", help="where to write the video (default sample.mp4)")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--fps", type=int, default=12)
    args = parser.parse_args()
    print(write_demo_video(args.path, num_frames=args.frames, fps=args.fps))


if __name__ == "__main__":
    main()

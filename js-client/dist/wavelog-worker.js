/* wavelog-worker browser client: built from js-client/src (placeholder until the JS client lands). */

//! Every operation's future is `Send` (and `'static` once it owns its
//! store), so that callers may spawn it on any runtime: a future holding a
//! borrowed connection across an await can lose that (sqlx's `Acquire` is
//! not general enough), and only a caller that spawns would notice. This
//! file compiles or fails; nothing runs.

use relay_store::{NewMessage, Store, StoreSettings};

fn spawnable<T: Send + 'static>(_: T) {}

#[allow(dead_code)]
fn store_futures_are_send(store: Store, settings: StoreSettings, messages: Vec<NewMessage>) {
    spawnable(Store::open(settings));
    let s = store.clone();
    spawnable(async move { s.import(messages).await });
    let s = store.clone();
    spawnable(async move { s.sweep_bodies().await });
    let s = store.clone();
    spawnable(async move { s.list_after(None, None, u32::MAX).await });
    let s = store.clone();
    spawnable(async move { s.census().await });
    let s = store.clone();
    spawnable(async move { s.remove("id").await });
    let s = store.clone();
    spawnable(async move { s.delete(&["id"]).await });
    let s = store.clone();
    spawnable(async move { s.body("id").await });
    let s = store.clone();
    spawnable(async move { s.release_all(&[]).await });
    spawnable(async move { store.clock_skew().await });
}
